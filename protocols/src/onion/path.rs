//! Path choice and per-hop delays, by the sender.
//!
//! A path is `hops` distinct mix nodes drawn uniformly at random from the
//! verified descriptors, never the sender or the recipient, followed by the
//! recipient (no exit node to trust). The first hop is drawn among the
//! mix nodes the sender can hand a packet to now (its entries: those it is
//! connected to) when it has any, like a Tor client's guards: the first hop
//! learns who sends anyway, and a packet handed to a node the sender cannot
//! reach is lost until the attempt times out. Each hop's delay is drawn from an
//! exponential distribution with the configured mean (Loopix), capped at
//! [`super::MAX_DELAY_MS`].

use std::collections::HashSet;

use libp2p_identity::PeerId;
use rand_core::Rng;

use super::MAX_DELAY_MS;

/// Why no path could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Fewer usable mix nodes than the path needs.
    #[error("waiting for onion mix nodes: {known} known, the path needs {needed}")]
    TooFewMixes {
        /// Usable mix nodes known.
        known: usize,
        /// Mix hops the path needs.
        needed: usize,
    },
}

/// Picks `hops` distinct indices of `mixes` uniformly at random, skipping
/// `me` and `to` (and any repeated peer). The first is drawn among the
/// mix nodes for which `entry` holds, when there is one; the others
/// uniformly among the rest.
pub fn choose_path(
    mixes: &[PeerId],
    me: &PeerId,
    to: &PeerId,
    hops: usize,
    entry: impl Fn(&PeerId) -> bool,
    rng: &mut impl Rng,
) -> Result<Vec<usize>, PathError> {
    let mut pool: Vec<usize> = Vec::with_capacity(mixes.len());
    // A set, not a scan of the pool: up to 4096 mix descriptors are kept,
    // and a path is drawn for every packet (cover packets included).
    let mut seen: HashSet<&PeerId> = HashSet::with_capacity(mixes.len());
    for (i, p) in mixes.iter().enumerate() {
        if p != me && p != to && seen.insert(p) {
            pool.push(i);
        }
    }
    if pool.len() < hops {
        return Err(PathError::TooFewMixes {
            known: pool.len(),
            needed: hops,
        });
    }
    // The first hop among the entries, if any.
    let entries: Vec<usize> = (0..pool.len())
        .filter(|k| entry(&mixes[pool[*k]]))
        .collect();
    let mut start = 0;
    if hops > 0 && !entries.is_empty() {
        let k = usize::try_from(uniform_below(rng, entries.len() as u64)).unwrap_or(0);
        pool.swap(0, entries[k]);
        start = 1;
    }
    sample_tail(&mut pool, start, hops, rng);
    Ok(pool)
}

/// Partial Fisher-Yates: leaves `pool[..start]` as it is and makes
/// `pool[start..n]` a uniform sample of `pool[start..]` in uniform order,
/// then truncates `pool` to `n` (to its length, if shorter).
pub(crate) fn sample_tail<T>(pool: &mut Vec<T>, start: usize, n: usize, rng: &mut impl Rng) {
    let n = n.min(pool.len());
    for i in start..n {
        let left = (pool.len() - i) as u64;
        let j = i + usize::try_from(uniform_below(rng, left)).unwrap_or(0);
        pool.swap(i, j);
    }
    pool.truncate(n);
}

/// A uniform integer below `n` (`n > 0`), without modulo bias.
fn uniform_below(rng: &mut impl Rng, n: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % n;
        }
    }
}

/// `n` delays, ms, exponential with mean `mean_ms` (0: no delays, the
/// "fast" profile), each capped at [`MAX_DELAY_MS`].
pub fn sample_delays(rng: &mut impl Rng, n: usize, mean_ms: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            if mean_ms == 0 {
                return 0;
            }
            // u in (0, 1]: 53 random bits.
            let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let d = -(mean_ms as f64) * u.ln();
            (d.round() as u64).min(MAX_DELAY_MS)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl rand_core::TryRng for Lcg {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok((self.try_next_u64()? >> 32) as u32)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Ok(self.0 ^ (self.0 >> 29))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            for b in dst {
                *b = self.try_next_u64()? as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn paths_are_distinct_skip_the_ends_and_cover_every_mix() {
        let mixes: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let (me, to) = (mixes[0], mixes[1]);
        let mut rng = Lcg(1);
        let mut seen = [0usize; 6];
        for _ in 0..3000 {
            let p = choose_path(&mixes, &me, &to, 3, |_| false, &mut rng).expect("enough");
            assert_eq!(p.len(), 3);
            for (a, i) in p.iter().enumerate() {
                assert!(*i >= 2, "never the sender or the recipient");
                assert!(!p[a + 1..].contains(i), "no node twice");
                seen[*i] += 1;
            }
        }
        // Uniform: each of the 4 usable mixes is on 3/4 of the paths.
        for n in &seen[2..] {
            assert!((2000..2500).contains(n), "{seen:?}");
        }
    }

    #[test]
    fn a_peer_listed_twice_counts_once_and_a_full_list_gives_paths() {
        let a = PeerId::random();
        let b = PeerId::random();
        let (me, to) = (PeerId::random(), PeerId::random());
        let e = choose_path(&[a, a, b, b], &me, &to, 3, |_| false, &mut Lcg(2));
        assert_eq!(
            e,
            Err(PathError::TooFewMixes {
                known: 2,
                needed: 3
            })
        );
        // As many mix descriptors as a node keeps: every packet's path is
        // drawn from them.
        let many: Vec<PeerId> = (0..4096).map(|_| PeerId::random()).collect();
        let mut rng = Lcg(3);
        for _ in 0..50 {
            let p = choose_path(&many, &me, &to, 3, |_| false, &mut rng).expect("enough");
            assert_eq!(p.len(), 3);
        }
    }

    #[test]
    fn the_first_hop_is_an_entry_when_there_is_one() {
        let mixes: Vec<PeerId> = (0..7).map(|_| PeerId::random()).collect();
        let (me, to) = (mixes[0], mixes[1]);
        // Entries: mixes 2 and 3 (and the recipient, which never counts).
        let entry = |p: &PeerId| [mixes[1], mixes[2], mixes[3]].contains(p);
        let mut rng = Lcg(4);
        let mut first = [0usize; 7];
        let mut later = [0usize; 7];
        for _ in 0..4000 {
            let p = choose_path(&mixes, &me, &to, 3, entry, &mut rng).expect("enough");
            assert_eq!(p.len(), 3);
            first[p[0]] += 1;
            for (a, i) in p.iter().enumerate() {
                assert!(*i >= 2, "never the sender or the recipient");
                assert!(!p[a + 1..].contains(i), "no node twice");
            }
            for i in &p[1..] {
                later[*i] += 1;
            }
        }
        // The first hop is one of the two entries, each half the time.
        assert_eq!(first[2] + first[3], 4000, "{first:?}");
        assert!((1800..2200).contains(&first[2]), "{first:?}");
        // The later hops are drawn from all the rest, the other entry too.
        for n in &later[2..] {
            assert!(*n > 0, "{later:?}");
        }
        // No entry at all: any mix may be first.
        let p = choose_path(&mixes, &me, &to, 3, |_| false, &mut rng).expect("enough");
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn too_few_mixes_is_said_with_the_numbers() {
        let mixes: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let err = choose_path(
            &mixes,
            &mixes[0],
            &PeerId::random(),
            3,
            |_| true,
            &mut Lcg(2),
        );
        assert_eq!(
            err,
            Err(PathError::TooFewMixes {
                known: 2,
                needed: 3
            })
        );
        assert!(
            err.expect_err("too few")
                .to_string()
                .contains("2 known, the path needs 3")
        );
    }

    #[test]
    fn delays_are_exponential_with_the_mean_and_capped() {
        let mut rng = Lcg(3);
        let d = sample_delays(&mut rng, 20_000, 50);
        let mean = d.iter().sum::<u64>() as f64 / d.len() as f64;
        assert!((45.0..55.0).contains(&mean), "{mean}");
        assert!(d.iter().all(|x| *x <= MAX_DELAY_MS));
        assert!(sample_delays(&mut rng, 4, 0).iter().all(|x| *x == 0));
    }
}
