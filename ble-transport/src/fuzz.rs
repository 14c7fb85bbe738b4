//! Fuzz targets for the BLE decoders of peer bytes, shared by the
//! cargo-fuzz crate (`fuzz/`) and the stable replay in `tests/corpus.rs`.
//! Hidden from the docs: a testing aid, not an API. See
//! `fogmesh_protocols::fuzz` for how targets are run and added.

use crate::advert::{self, Advert};
use crate::gatt::{self, Frame, Kind};

/// A target: name, body, seed inputs.
pub type Target = (&'static str, fn(&[u8]), fn() -> Vec<Vec<u8>>);

/// Every target of this crate.
pub const TARGETS: &[Target] = &[
    ("ble_advert", ble_advert, ble_advert_seeds),
    ("ble_gatt_frame", ble_gatt_frame, ble_gatt_frame_seeds),
    ("ble_sim_line", crate::sim::fuzz_line, ble_sim_line_seeds),
];

/// The advertisement's service data: whatever decodes re-encodes to the
/// same advertisement, from exactly the bytes it was read from.
pub fn ble_advert(data: &[u8]) {
    let Ok(a) = Advert::decode(data) else {
        return;
    };
    assert!(data.len() >= advert::LEN && data[0] == advert::VERSION);
    assert_eq!(a.psm.is_some(), data[1] & 1 == 1);
    if let Some(psm) = a.psm {
        assert_eq!(psm.to_be_bytes(), [data[2], data[3]]);
    }
    assert_eq!(a.peer_hint, data[4..10]);
    assert_eq!(Advert::decode(&a.encode()), Ok(a));
}

fn ble_advert_seeds() -> Vec<Vec<u8>> {
    let a = Advert {
        psm: Some(0x81),
        peer_hint: [1, 2, 3, 4, 5, 6],
    };
    let mut longer = a.encode().to_vec();
    longer.extend_from_slice(&[9, 9]);
    vec![
        a.encode().to_vec(),
        Advert { psm: None, ..a }.encode().to_vec(),
        longer,
    ]
}

/// A GATT write: bounded, and a frame re-encodes to a frame that decodes
/// to itself (a DATA frame to exactly its bytes).
pub fn ble_gatt_frame(data: &[u8]) {
    let Ok(f) = Frame::decode(data) else {
        return;
    };
    assert!(data.len() >= gatt::HEADER_LEN && data.len() <= gatt::MAX_VALUE);
    assert!(f.payload.len() <= gatt::MAX_VALUE - gatt::HEADER_LEN);
    assert!(!(f.kind == Kind::Open && f.from_acceptor));
    assert_eq!(f.link.to_be_bytes(), data[1..5]);
    let bytes = f.encode();
    assert_eq!(Frame::decode(&bytes), Ok(f));
    if f.kind == Kind::Data {
        assert_eq!(bytes, data);
    } else {
        assert!(f.payload.is_empty());
    }
}

fn ble_gatt_frame_seeds() -> Vec<Vec<u8>> {
    let f = |kind, from_acceptor, payload: &'static [u8]| {
        Frame {
            kind,
            from_acceptor,
            link: 0x0102_0304,
            payload,
        }
        .encode()
    };
    vec![
        f(Kind::Open, false, b""),
        f(Kind::Data, true, b"hello"),
        f(Kind::Close, true, b""),
    ]
}

fn ble_sim_line_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"hello":{"position":{"x":1.5,"y":-2.0}}}"#,
        r#"{"attach":{"link":3,"token":77}}"#,
        r#"{"admin":{"move":{"device":"02:00:00:00:00:01","position":{"x":0.0,"y":0.0}}}}"#,
        r#"{"admin":"list"}"#,
        r#"{"listen":{"req":1,"advert":"01018100010203040506"}}"#,
        r#"{"connect":{"req":2,"to":"02:00:00:00:00:02"}}"#,
        r#"{"move":{"position":{"x":3.0,"y":4.0}}}"#,
        r#"{"welcome":{"device":"02:00:00:00:00:01","model":{"range_m":30.0,"mtu":244}}}"#,
        r#"{"found":{"device":"02:00:00:00:00:02","advert":"01000000aabbccddeeff"}}"#,
        r#"{"incoming":{"link":4,"token":5,"from":"02:00:00:00:00:03"}}"#,
        r#"{"failed":{"req":1,"error":"bad advertisement"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
