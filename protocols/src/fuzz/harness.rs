//! What the targets share: the registry entry, a seeded generator, and the
//! stable replay (corpus files, then seeded mutations of them).

use std::convert::Infallible;
use std::path::{Path, PathBuf};

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name: the cargo-fuzz binary and `fuzz/corpus/<name>/`.
    pub name: &'static str,
    /// Its body: any bytes in, a panic only on a broken invariant.
    pub run: fn(&[u8]),
    /// A few valid inputs, the seed corpus.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

impl Target {
    /// A registry entry.
    pub const fn new(name: &'static str, run: fn(&[u8]), seeds: fn() -> Vec<Vec<u8>>) -> Self {
        Target { name, run, seeds }
    }
}

/// A deterministic generator (splitmix64) for seeds, mutations and the
/// randomness the code under test asks for. Marked as a `CryptoRng` so it
/// can be handed to sealing functions: fuzzing needs reproducible runs, not
/// secrets. Never use it outside tests and fuzzing.
#[derive(Debug, Clone)]
pub struct FuzzRng(u64);

impl FuzzRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        FuzzRng(seed)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.bits() % n as u64) as usize
        }
    }
}

impl rand_core::TryRng for FuzzRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.bits() >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.bits())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let v = self.bits().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for FuzzRng {}

/// CBOR bytes and edge values the mutator splices in, so that short runs
/// reach length fields and type tags that random bytes rarely hit.
const INTERESTING: &[&[u8]] = &[
    &[0x00],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x1a, 0xff, 0xff, 0xff, 0xff],
    &[0x5a, 0x7f, 0xff, 0xff, 0xff],
    &[0x9f],
    &[0xbf],
    &[0xf6],
    &[0xf7],
    &[0x58, 0x20],
    &[0x40],
    &[0x60],
    &[0xa0],
    &[0x80],
    b"#",
    b"\n",
    b"{\"",
    b"\":",
    b"fogmesh-file:",
];

/// One mutation of `input` (bit flips, byte edits, insertions, deletions,
/// truncation, duplication, splicing with another corpus entry, edge values).
pub fn mutate(rng: &mut FuzzRng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.bits() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                out.insert(i, rng.bits() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                out.drain(i..i + n);
            }
            4 => out.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let copy = out[i..i + n].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, copy);
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            7 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(len + 1);
                if rng.below(2) == 0 {
                    out.splice(i..i, v.iter().copied());
                } else {
                    let end = (i + v.len()).min(len);
                    out.splice(i..end, v.iter().copied());
                }
            }
            _ if len > 0 => {
                // Arithmetic on a byte: length fields are off by one.
                let i = rng.below(len);
                let d = rng.below(9) as u8;
                out[i] = if rng.below(2) == 0 {
                    out[i].wrapping_add(d)
                } else {
                    out[i].wrapping_sub(d)
                };
            }
            _ => out.push(rng.bits() as u8),
        }
    }
    out
}

/// The files of `dir`, sorted by name (none if it does not exist).
fn corpus_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs one input, and on a panic says which target and input (hex) so the
/// failure can be reproduced with `cargo fuzz run <target> <file>`.
fn run_one(target: &Target, input: &[u8], origin: &str) {
    let result = std::panic::catch_unwind(|| (target.run)(input));
    if let Err(cause) = result {
        let dump = std::env::temp_dir().join(format!("fogmesh-fuzz-{}-crash", target.name));
        let saved = std::fs::write(&dump, input).is_ok();
        let cause = cause
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| cause.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "fuzz target {} failed on {origin} ({} bytes{}): {cause}",
            target.name,
            input.len(),
            if saved {
                format!(", saved to {}", dump.display())
            } else {
                String::new()
            }
        );
    }
}

/// What [`replay`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Files of the committed corpus.
    pub corpus_files: usize,
    /// Mutated inputs.
    pub mutations: usize,
}

/// Replays the seeds and the files of `corpus_dir` through `target`, then
/// `mutations` inputs derived from them with a generator seeded by the
/// target's name (the same inputs on every run). Panics with the target and
/// input on the first broken invariant.
pub fn replay(target: &Target, corpus_dir: &Path, mutations: usize) -> Replayed {
    let mut inputs: Vec<Vec<u8>> = (target.seeds)();
    for seed in &inputs {
        run_one(target, seed, "a seed");
    }
    let files = corpus_files(corpus_dir);
    for (path, bytes) in &files {
        run_one(target, bytes, &path.display().to_string());
    }
    inputs.extend(files.iter().map(|(_, b)| b.clone()));
    let name_seed = target.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = FuzzRng::new(name_seed);
    for i in 0..mutations {
        let base = if inputs.is_empty() {
            Vec::new()
        } else {
            inputs[rng.below(inputs.len())].clone()
        };
        let input = mutate(&mut rng, &base, &inputs);
        run_one(target, &input, &format!("mutation {i}"));
        // Keep some mutants as bases, so later ones stack edits.
        if i % 16 == 0 && inputs.len() < 512 {
            inputs.push(input);
        }
    }
    Replayed {
        corpus_files: files.len(),
        mutations,
    }
}
