//! Fixed keys and sample values the targets and their seeds build on, so
//! every run (and every fuzzer) sees the same group, files and peers.

use std::sync::OnceLock;

use crate::files::{Bitfield, Manifest, ManifestBuilder};
use crate::groups::{Group, Keypair, Op, PeerId, SignedEnvelope};

use super::FuzzRng;

/// The keypair numbered `n` (its Ed25519 secret is `[n; 32]`).
pub(super) fn keypair(n: u8) -> Keypair {
    match Keypair::ed25519_from_bytes([n; 32]) {
        Ok(k) => k,
        Err(e) => panic!("fixed keypair {n}: {e}"),
    }
}

/// The peer id of [`keypair`]`(n)`.
pub(super) fn peer(n: u8) -> PeerId {
    keypair(n).public().to_peer_id()
}

/// The admin of the sample group.
pub(super) const ADMIN: u8 = 1;

/// A group's history, built once: the admin (key 1) founds it with keys 2
/// and 3, writes, adds key 4, removes key 3 (a new epoch), and keys 2 and 4
/// write too.
pub(super) struct Sample {
    /// Every op, genesis first.
    pub ops: Vec<Op>,
    /// Every envelope, in the order written.
    pub envelopes: Vec<SignedEnvelope>,
}

fn build_sample() -> Sample {
    let mut rng = FuzzRng::new(1);
    let members = [peer(2), peer(3)];
    let Ok((mut admin, mut ops)) =
        Group::create(keypair(ADMIN), "fuzz", "d", &members, &mut rng, 1)
    else {
        panic!("sample group")
    };
    let mut envelopes = Vec::new();
    let write = |g: &mut Group, text: &str, rng: &mut FuzzRng| match g.compose(rng, text, 2) {
        Ok((env, _)) => env,
        Err(e) => panic!("compose: {e}"),
    };
    envelopes.push(write(&mut admin, "hello", &mut rng));
    let add = admin.add(peer(4), &mut rng, 3);
    let remove = admin.remove(peer(3), &mut rng, 4);
    let (Ok(add), Ok(remove)) = (add, remove) else {
        panic!("admin ops")
    };
    ops.extend([add, remove]);
    envelopes.push(write(&mut admin, "after the removal", &mut rng));
    for n in [2, 4] {
        let Ok(mut g) = Group::join(keypair(n), ops[0].clone()) else {
            panic!("join")
        };
        for op in &ops[1..] {
            let _ = g.receive_op(op.clone());
        }
        for env in &envelopes {
            let _ = g.receive_message(env.clone());
        }
        envelopes.push(write(&mut g, &format!("from {n}"), &mut rng));
    }
    Sample { ops, envelopes }
}

/// The sample group (built on first use).
pub(super) fn sample() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(build_sample)
}

/// Deterministic file content.
pub(super) fn content(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// The manifest of `content(len, salt)` in chunks of `chunk` bytes.
pub(super) fn manifest(len: usize, chunk: u32, salt: u8, name: Option<&str>) -> Manifest {
    let Ok(mut b) = ManifestBuilder::new(chunk) else {
        panic!("chunk size {chunk}")
    };
    b.update(&content(len, salt));
    match b.finish(name.map(str::to_owned)) {
        Ok(m) => m,
        Err(e) => panic!("manifest: {e}"),
    }
}

/// A bitfield of `len` bits with every `step`-th set.
pub(super) fn bits(len: u64, step: u64) -> Bitfield {
    let mut b = Bitfield::new(len);
    for i in (0..len).step_by(step.max(1) as usize) {
        b.set(i);
    }
    b
}
