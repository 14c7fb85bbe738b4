//! Fuzz targets for every decoder of peer bytes and for the stateful cores,
//! shared by the cargo-fuzz crate (`fuzz/`, nightly) and the ordinary test
//! suite (`tests/corpus.rs`, stable), which replays each target's committed
//! corpus and a short seeded mutation run through the same functions.
//!
//! Hidden from the docs: it is a testing aid, not an API. Each target takes
//! arbitrary bytes, must never panic on them, and asserts what is known to
//! hold beyond "does not crash" (a decoded value re-encodes to bytes that
//! decode to the same value; a state machine keeps its invariants). A panic
//! here is a bug, either in the code under test or in the invariant.
//!
//! Adding a target: write `fn my_target(data: &[u8])` and `fn my_seeds() ->
//! Vec<Vec<u8>>`, add one line to [`TARGETS`], and one line to the `bin`
//! list of `fuzz/Cargo.toml`; then write its seed corpus with
//! `FOGMESH_WRITE_CORPUS=1 cargo test -p fogmesh-protocols --test corpus`.

mod decoders;
mod fixtures;
mod harness;
mod onion;
mod stateful;

pub use harness::{FuzzRng, Replayed, Target, mutate, replay};

/// Every target of this crate: name (the cargo-fuzz binary and the corpus
/// directory `fuzz/corpus/<name>/`), body, and seed inputs.
pub const TARGETS: &[Target] = &[
    Target::new("groups_op", decoders::groups_op, decoders::groups_op_seeds),
    Target::new(
        "groups_envelope",
        decoders::groups_envelope,
        decoders::groups_envelope_seeds,
    ),
    Target::new(
        "groups_summary",
        decoders::groups_summary,
        decoders::groups_summary_seeds,
    ),
    Target::new(
        "groups_sync_request",
        decoders::groups_sync_request,
        decoders::groups_sync_request_seeds,
    ),
    Target::new(
        "groups_sync_response",
        decoders::groups_sync_response,
        decoders::groups_sync_response_seeds,
    ),
    Target::new(
        "groups_gossip",
        decoders::groups_gossip,
        decoders::groups_gossip_seeds,
    ),
    Target::new(
        "files_request",
        decoders::files_request,
        decoders::files_request_seeds,
    ),
    Target::new(
        "files_response",
        decoders::files_response,
        decoders::files_response_seeds,
    ),
    Target::new(
        "files_manifest",
        decoders::files_manifest,
        decoders::files_manifest_seeds,
    ),
    Target::new(
        "files_bitfield",
        decoders::files_bitfield,
        decoders::files_bitfield_seeds,
    ),
    Target::new("file_link", decoders::file_link, decoders::file_link_seeds),
    Target::new(
        "dm_envelope",
        decoders::dm_envelope,
        decoders::dm_envelope_seeds,
    ),
    Target::new("dm_ack", decoders::dm_ack, decoders::dm_ack_seeds),
    Target::new("dm_letter", decoders::dm_letter, decoders::dm_letter_seeds),
    Target::new(
        "dm_letter_plain",
        decoders::dm_letter_plain,
        decoders::dm_letter_plain_seeds,
    ),
    Target::new("rr_frame", decoders::rr_frame, decoders::rr_frame_seeds),
    Target::new(
        "mailbox_request",
        decoders::mailbox_request,
        decoders::mailbox_request_seeds,
    ),
    Target::new(
        "mailbox_response",
        decoders::mailbox_response,
        decoders::mailbox_response_seeds,
    ),
    Target::new(
        "groups_membership",
        stateful::groups_membership,
        stateful::groups_membership_seeds,
    ),
    Target::new(
        "groups_causal",
        stateful::groups_causal,
        stateful::groups_causal_seeds,
    ),
    Target::new(
        "files_scheduler",
        stateful::files_scheduler,
        stateful::files_scheduler_seeds,
    ),
    Target::new(
        "onion_descriptor",
        onion::onion_descriptor,
        onion::onion_descriptor_seeds,
    ),
    Target::new("onion_piece", onion::onion_piece, onion::onion_piece_seeds),
    Target::new("onion_surb", onion::onion_surb, onion::onion_surb_seeds),
    Target::new(
        "onion_packet",
        onion::onion_packet,
        onion::onion_packet_seeds,
    ),
    Target::new(
        "onion_mix_frames",
        onion::onion_mix_frames,
        onion::onion_mix_frames_seeds,
    ),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
