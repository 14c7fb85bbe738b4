//! Targets for the decoders of peer bytes: each decodes, and whatever
//! decodes must re-encode to bytes that decode to the same value and
//! re-encode identically (ids and hashes are taken over our re-encoding),
//! plus what else is known of the type.

use std::fmt::Debug;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::files::wire::{self as fwire, MAX_ERROR_MESSAGE};
use crate::files::{
    Bitfield, ErrorCode, FileId, FileLink, MAX_MANIFEST_SIZE, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE,
    Manifest, Request, Response, find_links,
};
use crate::frame::cbor;
use crate::groups::crypto::{self as gcrypto, MemberSecret};
use crate::groups::gossip::{self, GossipFrame};
use crate::groups::sync::{MAX_RANGE_LEN, MAX_RANGES};
use crate::groups::wire::{self as gwire, MAX_ENVELOPE_SIZE, MAX_OP_SIZE};
use crate::groups::{GroupId, Keypair, PeerId, Summary, SyncRequest, SyncResponse, Want, diff};
use crate::groups::{next_request, wire::MAX_SUMMARY_SIZE};
use crate::messages::letter::{self, MAX_BODY, SEAL_INFO, SIGN_DOMAIN};
use crate::messages::wire::{MAX_ACK, MAX_ENVELOPE};
use crate::messages::{Ack, Envelope, Letter, MessageId, Payload, Receipt, Refusal, open};

use super::FuzzRng;
use super::fixtures::{self, peer, sample};

/// Decodes `data`; if it decodes, checks the round trip and returns the value.
///
/// A re-encoding may only fail to decode when it is over the limit (an
/// input may omit an optional field our encoding writes as `null`).
fn stable<T, E>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
    max: usize,
) -> Option<T>
where
    T: PartialEq + Debug,
    E: Debug,
{
    let value = decode(data).ok()?;
    assert!(
        data.len() <= max,
        "{} bytes decoded, limit {max}",
        data.len()
    );
    let bytes = encode(&value);
    match decode(&bytes) {
        Ok(again) => {
            assert_eq!(again, value, "decode(encode(v)) != v");
            assert_eq!(encode(&again), bytes, "re-encoding is not stable");
        }
        Err(e) => assert!(
            bytes.len() > max,
            "the re-encoding of a decoded value does not decode: {e:?}"
        ),
    }
    Some(value)
}

/// [`stable`] for the other target modules.
pub(super) fn stable_pub<T, E>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
    max: usize,
) -> Option<T>
where
    T: PartialEq + Debug,
    E: Debug,
{
    stable(data, decode, encode, max)
}

/// Frames every target's seeds share: a `v`/`m` head with nothing after.
fn frame_heads() -> Vec<Vec<u8>> {
    vec![vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm', 0xf6]]
}

// ---- groups -------------------------------------------------------------

pub(super) fn groups_op(data: &[u8]) {
    if let Some(op) = stable(data, gwire::decode_op, gwire::encode_op, MAX_OP_SIZE) {
        // The hash is over our re-encoding, whatever the peer's bytes.
        let h: [u8; 32] = Sha256::digest(gwire::encode_op(&op)).into();
        assert_eq!(op.hash(), h);
    }
}

pub(super) fn groups_op_seeds() -> Vec<Vec<u8>> {
    let mut s: Vec<_> = sample().ops.iter().map(gwire::encode_op).collect();
    s.extend(frame_heads());
    s
}

pub(super) fn groups_envelope(data: &[u8]) {
    if let Some(env) = stable(
        data,
        gwire::decode_envelope,
        gwire::encode_envelope,
        MAX_ENVELOPE_SIZE,
    ) {
        let h: [u8; 32] = Sha256::digest(gwire::encode_envelope(&env)).into();
        assert_eq!(env.id().0, h);
    }
}

pub(super) fn groups_envelope_seeds() -> Vec<Vec<u8>> {
    sample()
        .envelopes
        .iter()
        .map(gwire::encode_envelope)
        .collect()
}

/// What a node answers about a peer-supplied summary: a bounded want.
fn check_diff(remote: &Summary) {
    let local = Summary {
        membership_len: 3,
        heads_hash: [9; 32],
        per_sender: vec![(peer(1), 2), (peer(2), u64::MAX - 1)],
    };
    let want = diff(&local, remote);
    assert!(want.ranges.len() <= MAX_RANGES);
    for (_, from, to) in &want.ranges {
        assert!(*from >= 1 && from <= to, "range {from}..={to}");
        assert!(to - from < MAX_RANGE_LEN, "range {from}..={to} too long");
    }
    if let Some(from) = want.membership_from {
        assert!(from == local.membership_len && remote.membership_len > from);
    }
    let _ = next_request(GroupId([1; 32]), &local, remote);
}

fn sample_summary() -> Summary {
    Summary {
        membership_len: 3,
        heads_hash: [7; 32],
        per_sender: vec![(peer(1), 2), (peer(2), 1), (peer(4), 300)],
    }
}

pub(super) fn groups_summary(data: &[u8]) {
    if let Some(s) = stable(
        data,
        gwire::decode_summary,
        gwire::encode_summary,
        MAX_SUMMARY_SIZE,
    ) {
        check_diff(&s);
    }
}

pub(super) fn groups_summary_seeds() -> Vec<Vec<u8>> {
    let s = sample_summary();
    vec![gwire::encode_summary(&s), gwire::encode_summary(&s.brief())]
}

pub(super) fn groups_sync_request(data: &[u8]) {
    if let Some(req) = stable(
        data,
        gwire::decode_sync_request,
        gwire::encode_sync_request,
        gwire::MAX_SYNC_REQUEST_SIZE,
    ) && let Some(s) = req.summary()
    {
        check_diff(s);
    }
}

pub(super) fn groups_sync_request_seeds() -> Vec<Vec<u8>> {
    let g = GroupId([3; 32]);
    [
        SyncRequest::Summary {
            group_id: g,
            summary: sample_summary(),
        },
        SyncRequest::Fetch {
            group_id: g,
            want: Want {
                membership_from: Some(1),
                ranges: vec![(peer(2), 1, 5), (peer(1), 3, 3)],
                need_full_summary: false,
            },
        },
    ]
    .iter()
    .map(gwire::encode_sync_request)
    .collect()
}

pub(super) fn groups_sync_response(data: &[u8]) {
    if let Some(resp) = stable(
        data,
        gwire::decode_sync_response,
        gwire::encode_sync_response,
        gwire::MAX_SYNC_RESPONSE_SIZE,
    ) && let Some(s) = &resp.summary
    {
        check_diff(s);
    }
}

pub(super) fn groups_sync_response_seeds() -> Vec<Vec<u8>> {
    let s = sample();
    let Ok(log) = crate::groups::MembershipLog::from_genesis(s.ops[0].clone()) else {
        panic!("genesis")
    };
    [
        SyncResponse {
            group_id: log.id(),
            summary: Some(sample_summary()),
            ops: s.ops[1..].to_vec(),
            messages: s.envelopes[..2].to_vec(),
        },
        SyncResponse::empty(log.id()),
    ]
    .iter()
    .map(gwire::encode_sync_response)
    .collect()
}

pub(super) fn groups_gossip(data: &[u8]) {
    let Ok(frame) = gossip::decode_gossip(data) else {
        return;
    };
    // The frame is its tag and the wire frame: it re-encodes to a frame
    // that decodes to the same value.
    let again = match &frame {
        GossipFrame::Message(env) => {
            assert_eq!(data[0], gossip::TAG_MESSAGE);
            gossip::encode_gossip_message(env)
        }
        GossipFrame::Op(op) => {
            assert_eq!(data[0], gossip::TAG_OP);
            gossip::encode_gossip_op(op)
        }
    };
    if let Ok(back) = gossip::decode_gossip(&again) {
        assert_eq!(back, frame);
    } else {
        assert!(again.len() > MAX_OP_SIZE.min(MAX_ENVELOPE_SIZE));
    }
}

pub(super) fn groups_gossip_seeds() -> Vec<Vec<u8>> {
    let s = sample();
    let mut v: Vec<_> = s.ops[1..].iter().map(gossip::encode_gossip_op).collect();
    v.extend(
        s.envelopes
            .iter()
            .take(2)
            .map(gossip::encode_gossip_message),
    );
    v
}

// ---- files --------------------------------------------------------------

/// What every decoded manifest satisfies.
fn check_manifest(m: &Manifest) {
    let count = m.chunk_count();
    assert_eq!(count, m.chunk_hashes().len() as u64);
    let mut total = 0u64;
    for i in 0..count {
        let len = m.chunk_len(i).map(u64::from);
        let off = m.chunk_offset(i);
        let (Some(len), Some(off)) = (len, off) else {
            panic!("chunk {i} of {count} has no length or offset")
        };
        assert!(len >= 1 && len <= u64::from(m.chunk_size()));
        assert_eq!(off, total);
        total += len;
        if i > 2 && i + 2 < count {
            // Only the ends are interesting; skip the middle of big files.
            continue;
        }
    }
    assert_eq!(total, m.size());
    assert!(m.chunk_len(count).is_none() && m.chunk_offset(count).is_none());
    assert!(m.name().is_none_or(|n| n.len() <= 255));
    let id = m.id();
    assert!(m.verify(&id).is_ok());
    assert_eq!(id.to_hex().parse::<FileId>().ok(), Some(id));
    // A chunk of the wrong length never verifies.
    if count > 0 {
        assert!(!m.verify_chunk(0, &[]));
    }
}

/// What every decoded bitfield satisfies.
fn check_bitfield(b: &Bitfield, probe: u64) {
    let len = b.len();
    let count = b.count();
    assert!(count <= len);
    assert_eq!(b.as_bytes().len() as u64, len.div_ceil(8));
    assert_eq!(b.is_full(), count == len);
    assert_eq!(b.is_empty(), len == 0);
    // Iterating is linear in the length: only when it is small.
    if len <= 4096 {
        assert_eq!(b.iter_set().count() as u64, count);
        assert_eq!(b.iter_missing().count() as u64, len - count);
        assert!(b.iter_set().all(|i| b.get(i)));
    }
    let i = if len == 0 { probe } else { probe % (len + 1) };
    let mut c = b.clone();
    let had = c.get(i);
    assert_eq!(c.set(i), !had && i < len);
    assert_eq!(c.get(i), i < len);
    assert!(c.clear(i) == (i < len));
    assert!(!c.get(i));
    assert!(!b.get(len));
}

pub(super) fn files_request(data: &[u8]) {
    if let Some(req) = stable(
        data,
        fwire::decode_request,
        fwire::encode_request,
        MAX_REQUEST_SIZE,
    ) {
        // Whatever decodes re-encodes well within the limit.
        assert!(fwire::encode_request(&req).len() <= MAX_REQUEST_SIZE);
        let _ = req.file();
    }
}

pub(super) fn files_request_seeds() -> Vec<Vec<u8>> {
    let file = fixtures::manifest(5000, 1024, 1, None).id();
    [
        Request::GetManifest { file },
        Request::GetHave { file },
        Request::GetChunk { file, index: 3 },
    ]
    .iter()
    .map(fwire::encode_request)
    .collect()
}

pub(super) fn files_response(data: &[u8]) {
    let Some(resp) = stable(
        data,
        fwire::decode_response,
        fwire::encode_response,
        MAX_RESPONSE_SIZE,
    ) else {
        return;
    };
    match &resp {
        Response::Manifest(m) => check_manifest(m),
        Response::Have { bits } => check_bitfield(bits, data.len() as u64),
        Response::Error { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE),
        _ => {}
    }
}

pub(super) fn files_response_seeds() -> Vec<Vec<u8>> {
    let m = fixtures::manifest(5000, 1024, 1, Some("notes.txt"));
    [
        Response::Manifest(m),
        Response::Have {
            bits: fixtures::bits(5, 2),
        },
        Response::Chunk {
            index: 2,
            data: fixtures::content(1024, 1),
        },
        Response::error(ErrorCode::Busy, "busy"),
        Response::error(ErrorCode::Unknown(77), ""),
    ]
    .iter()
    .map(fwire::encode_response)
    .collect()
}

fn decode_cbor<T: serde::de::DeserializeOwned>(data: &[u8], max: usize) -> Result<T, String> {
    if data.len() > max {
        return Err("too large".into());
    }
    let mut r = data;
    let v = ciborium::from_reader(&mut r).map_err(|e| e.to_string())?;
    if r.is_empty() {
        Ok(v)
    } else {
        Err("trailing bytes".into())
    }
}

pub(super) fn files_manifest(data: &[u8]) {
    let max = MAX_MANIFEST_SIZE;
    if let Some(m) = stable(data, |d| decode_cbor::<Manifest>(d, max), cbor, max) {
        check_manifest(&m);
    }
}

pub(super) fn files_manifest_seeds() -> Vec<Vec<u8>> {
    vec![
        cbor(&fixtures::manifest(5000, 1024, 1, Some("a.txt"))),
        cbor(&fixtures::manifest(0, 1024, 1, None)),
        cbor(&fixtures::manifest(3 * 1024, 1024, 2, Some("b c.bin"))),
    ]
}

pub(super) fn files_bitfield(data: &[u8]) {
    let max = MAX_MANIFEST_SIZE;
    if let Some(b) = stable(data, |d| decode_cbor::<Bitfield>(d, max), cbor, max) {
        check_bitfield(&b, data.len() as u64 * 7);
    }
}

pub(super) fn files_bitfield_seeds() -> Vec<Vec<u8>> {
    vec![
        cbor(&fixtures::bits(0, 1)),
        cbor(&fixtures::bits(13, 3)),
        cbor(&Bitfield::full(17)),
    ]
}

pub(super) fn file_link(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let links = find_links(&text);
    assert!(links.len() <= 16);
    let parsed = text.parse::<FileLink>().ok();
    for link in links.iter().chain(parsed.iter()) {
        // Displayed links are canonical and parse back to the same link.
        let shown = link.to_string();
        assert_eq!(shown.parse::<FileLink>().ok().as_ref(), Some(link));
        // `#<key>` (version 1, stream) or `#v2:<key>` (sealed).
        let expected = 13
            + 64
            + match &link.key {
                None => 0,
                Some(k) if k.scheme == crate::files::KeyScheme::Stream => 65,
                Some(_) => 68,
            };
        assert_eq!(shown.len(), expected);
        assert_eq!(shown, shown.to_ascii_lowercase());
    }
}

pub(super) fn file_link_seeds() -> Vec<Vec<u8>> {
    let id = fixtures::manifest(100, 1024, 3, None).id();
    let plain = FileLink { id, key: None };
    let keyed = FileLink {
        id,
        key: Some(crate::files::FileKey {
            bytes: [5; 32],
            scheme: crate::files::KeyScheme::Sealed,
        }),
    };
    let v1 = FileLink {
        id,
        key: Some(crate::files::FileKey {
            bytes: [6; 32],
            scheme: crate::files::KeyScheme::Stream,
        }),
    };
    vec![
        plain.to_string().into_bytes(),
        keyed.to_string().into_bytes(),
        v1.to_string().into_bytes(),
        format!("look: {keyed} and {plain}\n").into_bytes(),
    ]
}

// ---- direct messages ----------------------------------------------------

pub(super) fn dm_envelope(data: &[u8]) {
    if let Some(env) = stable(data, Envelope::decode, Envelope::encode, MAX_ENVELOPE) {
        assert!(env.body.len() <= MAX_BODY);
        let mut hop = env.clone();
        hop.ttl = env.ttl.wrapping_add(1);
        assert_eq!(hop.id(), env.id());
    }
}

pub(super) fn dm_envelope_seeds() -> Vec<Vec<u8>> {
    let body = sealed_seeds().into_iter().next().unwrap_or_default();
    vec![
        Envelope {
            to: recipient().2,
            ttl: 7,
            body,
        }
        .encode(),
        Envelope {
            to: peer(9),
            ttl: 1,
            body: vec![0; 64],
        }
        .encode(),
    ]
}

pub(super) fn dm_ack(data: &[u8]) {
    stable(data, Ack::decode, Ack::encode, MAX_ACK);
}

pub(super) fn dm_ack_seeds() -> Vec<Vec<u8>> {
    [
        Ack::Accepted,
        Ack::Refused(Refusal::Busy),
        Ack::Refused(Refusal::NoRoute),
    ]
    .iter()
    .map(Ack::encode)
    .collect()
}

/// The recipient of the letter target: key 10, its secret and peer id.
fn recipient() -> &'static (Keypair, MemberSecret, PeerId) {
    static R: OnceLock<(Keypair, MemberSecret, PeerId)> = OnceLock::new();
    R.get_or_init(|| {
        let k = fixtures::keypair(10);
        let Ok(secret) = MemberSecret::from_keypair(&k) else {
            panic!("secret")
        };
        let id = k.public().to_peer_id();
        (k, secret, id)
    })
}

/// The sender of seeded letters: key 11.
fn sender() -> &'static Keypair {
    static S: OnceLock<Keypair> = OnceLock::new();
    S.get_or_init(|| fixtures::keypair(11))
}

fn sample_payloads() -> Vec<Payload> {
    vec![
        Payload::Letter(Letter {
            id: MessageId([7; 16]),
            seq: 2,
            floor: 1,
            attempt: 0,
            sent_at_ms: 1_700_000_000_000,
            text: "hi".into(),
        }),
        Payload::Receipt(Receipt {
            ids: vec![(MessageId([7; 16]), 1)],
        }),
    ]
}

fn sealed_seeds() -> Vec<Vec<u8>> {
    let (_, _, to) = recipient();
    let mut rng = FuzzRng::new(10);
    sample_payloads()
        .iter()
        .filter_map(|p| letter::seal(&mut rng, sender(), to, p).ok())
        .collect()
}

/// Pads like `letter::pad`: a length prefix, the data, zeros to 512 bytes
/// (or just past the data when longer).
fn pad(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().max(512), 0);
    out
}

/// Seals `plain` to the recipient, as a sender would.
fn seal_raw(plain: &[u8]) -> Option<Vec<u8>> {
    let (_, _, to) = recipient();
    let (enc, ct) = gcrypto::seal_to_peer(
        &mut FuzzRng::new(plain.len() as u64),
        to,
        SEAL_INFO,
        &to.to_bytes(),
        plain,
    )
    .ok()?;
    let mut body = enc.to_vec();
    body.extend_from_slice(&ct);
    Some(body)
}

#[derive(serde::Serialize)]
struct Signed<'a> {
    #[serde(rename = "f")]
    from: PeerId,
    #[serde(rename = "t")]
    to: PeerId,
    #[serde(rename = "p", with = "serde_bytes")]
    payload: &'a [u8],
    #[serde(rename = "s", with = "serde_bytes")]
    sig: Vec<u8>,
}

/// `open` with a fixed recipient. The first byte picks how deep the rest
/// goes: 0, a raw body (HPKE refuses almost all); 1, a padded plaintext
/// sealed for it (reaches the unpadding and the signed wrapper); 2, a
/// payload signed by a fixed sender and sealed (reaches the payload
/// decoder, and must open exactly when the payload decodes and is in
/// bounds).
pub(super) fn dm_letter(data: &[u8]) {
    let (_, secret, me) = recipient();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(opened) = open(secret, me, rest) {
                assert!(rest.len() <= MAX_BODY);
                let _ = opened;
            }
        }
        1 => {
            let Some(body) = seal_raw(rest) else { return };
            let _ = open(secret, me, &body);
        }
        _ => {
            let from = sender().public().to_peer_id();
            let mut signed_bytes = me.to_bytes();
            signed_bytes.extend_from_slice(rest);
            let Ok(sig) = gcrypto::sign(sender(), SIGN_DOMAIN, &signed_bytes) else {
                return;
            };
            let inner = cbor(&Signed {
                from,
                to: *me,
                payload: rest,
                sig,
            });
            let Some(body) = seal_raw(&pad(&inner)) else {
                return;
            };
            let opened = open(secret, me, &body);
            let decoded: Option<Payload> = ciborium::from_reader(rest).ok();
            let in_bounds = match &decoded {
                Some(Payload::Letter(l)) => l.text.len() <= crate::messages::MAX_TEXT,
                Some(Payload::Receipt(r)) => r.ids.len() <= letter::MAX_RECEIPT_IDS,
                None => false,
            };
            let too_big = body.len() > MAX_BODY;
            match opened {
                Ok(o) => {
                    assert_eq!(o.from, from);
                    assert_eq!(Some(&o.payload), decoded.as_ref());
                    assert!(in_bounds && !too_big);
                    let p: Option<Payload> = ciborium::from_reader(&cbor(&o.payload)[..]).ok();
                    assert_eq!(p.as_ref(), Some(&o.payload));
                }
                Err(e) => assert!(
                    !in_bounds || too_big,
                    "a signed, sealed, valid payload did not open: {e}"
                ),
            }
        }
    }
}

/// What `open` does after decryption, on a padded plaintext as it is:
/// fast enough for long runs (no key agreement per input). Whatever opens
/// was signed by its claimed sender for this recipient and is in bounds.
pub(super) fn dm_letter_plain(data: &[u8]) {
    let (_, _, me) = recipient();
    if let Ok(opened) = letter::open_padded(me, data) {
        match &opened.payload {
            Payload::Letter(l) => assert!(l.text.len() <= crate::messages::MAX_TEXT),
            Payload::Receipt(r) => assert!(r.ids.len() <= letter::MAX_RECEIPT_IDS),
        }
        // Its payload re-encodes to something that decodes the same.
        let again: Payload =
            ciborium::from_reader(cbor(&opened.payload).as_slice()).expect("re-encoded payload");
        assert_eq!(again, opened.payload);
    }
}

pub(super) fn dm_letter_plain_seeds() -> Vec<Vec<u8>> {
    let (_, _, me) = recipient();
    let from = sender().public().to_peer_id();
    let mut v = Vec::new();
    for p in sample_payloads() {
        let payload = cbor(&p);
        let mut signed_bytes = me.to_bytes();
        signed_bytes.extend_from_slice(&payload);
        let Ok(sig) = gcrypto::sign(sender(), SIGN_DOMAIN, &signed_bytes) else {
            continue;
        };
        v.push(pad(&cbor(&Signed {
            from,
            to: *me,
            payload: &payload,
            sig,
        })));
    }
    v.push(pad(b"\xa0"));
    v
}

pub(super) fn dm_letter_seeds() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = sealed_seeds()
        .into_iter()
        .map(|b| [vec![0], b].concat())
        .collect();
    for p in sample_payloads() {
        v.push([vec![2], cbor(&p)].concat());
    }
    v.push([vec![1], pad(b"\xa0")].concat());
    v
}

// ---- mailboxes ----------------------------------------------------------

pub(super) fn mailbox_request(data: &[u8]) {
    use crate::mailbox::wire::{MAX_DELETE_IDS, MAX_DEPOSIT, MAX_REQUEST, Request};
    if let Some(req) = stable(data, Request::decode, Request::encode, MAX_REQUEST) {
        match req {
            Request::Deposit { envelope } => assert!(envelope.len() <= MAX_DEPOSIT),
            Request::Delete { ids } => assert!(ids.len() <= MAX_DELETE_IDS),
            Request::Fetch => {}
        }
    }
}

pub(super) fn mailbox_request_seeds() -> Vec<Vec<u8>> {
    use crate::mailbox::wire::{Id, Request};
    let env = Envelope {
        to: peer(9),
        ttl: 7,
        body: vec![1; 560],
    };
    vec![
        Request::Deposit {
            envelope: env.encode(),
        }
        .encode(),
        Request::Fetch.encode(),
        Request::Delete {
            ids: vec![Id::of(&env), Id([7; 16])],
        }
        .encode(),
    ]
}

pub(super) fn mailbox_response(data: &[u8]) {
    use crate::mailbox::wire::{MAX_DEPOSIT, MAX_FETCH_ITEMS, MAX_RESPONSE, Response};
    if let Some(Response::Fetched { items, .. }) =
        stable(data, Response::decode, Response::encode, MAX_RESPONSE)
    {
        assert!(items.len() <= MAX_FETCH_ITEMS);
        assert!(items.iter().all(|i| i.envelope.len() <= MAX_DEPOSIT));
    }
}

pub(super) fn mailbox_response_seeds() -> Vec<Vec<u8>> {
    use crate::mailbox::wire::{Id, Item, Refusal as MRefusal, Response};
    let env = Envelope {
        to: peer(9),
        ttl: 7,
        body: vec![1; 560],
    };
    vec![
        Response::Deposited.encode(),
        Response::Refused(MRefusal::OverQuota).encode(),
        Response::Fetched {
            items: vec![Item {
                id: Id::of(&env),
                envelope: env.encode(),
            }],
            more: false,
        }
        .encode(),
        Response::Deleted { count: 1 }.encode(),
    ]
}

// ---- the node's request-response framing ---------------------------------

/// The length-prefixed frames of the node's request-response codec
/// (`node/src/codec.rs` reads through these functions). The first byte
/// picks the limit (1 B to 16 MiB); the rest is the stream.
pub(super) fn rr_frame(data: &[u8]) {
    use crate::length_prefix::{MAX_PREFIX_LEN, PrefixError, frame, parse_prefix, split_frame};
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let max = 1usize << (pick % 25);
    let whole = parse_prefix(stream, max);
    // Byte by byte, as the codec reads: incomplete until the prefix's last
    // byte, then the same answer as the whole.
    let mut bytewise = Ok(None);
    for i in 1..=stream.len().min(MAX_PREFIX_LEN) {
        bytewise = parse_prefix(&stream[..i], max);
        if !matches!(bytewise, Ok(None)) {
            break;
        }
    }
    assert_eq!(bytewise, whole);
    match whole {
        Ok(Some((len, at))) => {
            assert!(len <= max && (1..=MAX_PREFIX_LEN).contains(&at));
            match split_frame(stream, max) {
                Ok(Some((body, rest))) => {
                    assert_eq!(body.len(), len);
                    // Minimal prefixes: re-framing gives back the same bytes.
                    let again = frame(body, max);
                    assert_eq!(again.as_deref().ok(), Some(&stream[..at + len]));
                    assert_eq!(rest, &stream[at + len..]);
                }
                Ok(None) => assert!(stream.len() < at + len),
                Err(e) => panic!("prefix parsed, frame refused: {e}"),
            }
        }
        Ok(None) => assert!(stream.len() < MAX_PREFIX_LEN),
        Err(PrefixError::TooLong { len, max: m }) => assert!(m == max && len > max as u64),
        Err(PrefixError::Overflow | PrefixError::NotMinimal) => {}
    }
}

pub(super) fn rr_frame_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (pick, body) in [(4u8, &b"hello"[..]), (24, &[7; 300][..]), (0, &b""[..])] {
        let mut s = vec![pick];
        s.extend(crate::length_prefix::frame(body, 1 << 24).unwrap_or_default());
        seeds.push(s);
    }
    seeds.push(vec![20, 0x81, 0x00]);
    seeds.push(vec![
        24, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    seeds.push(vec![2, 0x05, b'h']);
    seeds
}
