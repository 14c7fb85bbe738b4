//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`)
//! and a short seeded mutation run through the same functions cargo-fuzz
//! runs, so a regression fails the ordinary (stable) test suite.
//!
//! `FOGMESH_WRITE_CORPUS=1` writes each target's seeds into its corpus
//! directory (named by content hash, so rewriting is idempotent).

use std::path::PathBuf;

use fogmesh_protocols::fuzz::{TARGETS, Target, replay};

/// Mutated inputs per target; `FOGMESH_FUZZ_MUTATIONS` overrides.
const MUTATIONS: usize = 3000;

fn corpus_dir(target: &Target) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target.name)
}

/// Mutated inputs for `target`: fewer for the targets that sign and seal
/// on every input, so the suite stays quick.
fn mutations(target: &Target) -> usize {
    let n = std::env::var("FOGMESH_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MUTATIONS);
    match target.name {
        "groups_membership" => n / 10,
        "dm_letter" => n / 3,
        _ => n,
    }
}

fn write_seeds(target: &Target) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for seed in (target.seeds)() {
        // FNV-1a of the content: a stable file name.
        let h = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        std::fs::write(dir.join(format!("seed-{h:016x}")), &seed).expect("write seed");
    }
}

#[test]
fn every_target_replays_its_corpus_and_a_mutation_run() {
    let write = std::env::var_os("FOGMESH_WRITE_CORPUS").is_some();
    for target in TARGETS {
        if write {
            write_seeds(target);
        }
        let done = replay(target, &corpus_dir(target), mutations(target));
        assert!(
            done.corpus_files > 0,
            "no corpus for {} in {} (write it with FOGMESH_WRITE_CORPUS=1)",
            target.name,
            corpus_dir(target).display()
        );
    }
}

#[test]
fn fuzz_crate_lists_every_target() {
    let manifest = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"),
    )
    .expect("fuzz/Cargo.toml");
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name)),
            "fuzz/Cargo.toml has no bin for {}",
            target.name
        );
    }
}
