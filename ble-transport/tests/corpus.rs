//! Replays the BLE fuzz targets' committed corpora (`fuzz/corpus/<target>/`)
//! and a short seeded mutation run, on stable, through the functions
//! cargo-fuzz runs. `FOGMESH_WRITE_CORPUS=1` writes the seeds.

use std::path::PathBuf;

use fogmesh_protocols::fuzz::{Target, replay};

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

#[test]
fn every_ble_target_replays_its_corpus_and_a_mutation_run() {
    let mutations = std::env::var("FOGMESH_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    for &(name, run, seeds) in fogmesh_ble::fuzz::TARGETS {
        let target = Target::new(name, run, seeds);
        if std::env::var_os("FOGMESH_WRITE_CORPUS").is_some() {
            let dir = corpus_dir(name);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            for seed in seeds() {
                let h = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
                });
                std::fs::write(dir.join(format!("seed-{h:016x}")), &seed).expect("write");
            }
        }
        let done = replay(&target, &corpus_dir(name), mutations);
        assert!(done.corpus_files > 0, "no corpus for {name}");
    }
}
