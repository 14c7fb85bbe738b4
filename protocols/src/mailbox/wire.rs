//! The frames of `/fogmesh/mailbox/1`: one request, one response, each a
//! versioned CBOR frame, size-checked before parsing.
//!
//! Who asks is known to the holder from the Noise-authenticated
//! connection, never from the frame: a fetch hands out only envelopes
//! whose `to` is the asking peer, and a delete removes only envelopes
//! addressed to the asking peer or deposited by it.

use serde::{Deserialize, Serialize};

pub use crate::frame::WireError;
use crate::frame::{decode, encode};
use crate::messages::Envelope;

/// Version of the mailbox frames.
pub const VERSION: u64 = 1;
/// Largest deposited envelope frame (BitChat's courier limit): letters
/// padded to 512 B, 2 KiB and 8 KiB fit, larger ones are sent only
/// directly.
pub const MAX_DEPOSIT: usize = 16 * 1024;
/// Most envelopes one fetch answer carries (the rest: `more`).
pub const MAX_FETCH_ITEMS: usize = 16;
/// Most ids one delete names.
pub const MAX_DELETE_IDS: usize = 64;
/// Largest request frame.
pub const MAX_REQUEST: usize = MAX_DEPOSIT + 128;
/// Largest response frame.
pub const MAX_RESPONSE: usize = MAX_FETCH_ITEMS * (MAX_DEPOSIT + 64) + 128;

/// An envelope's id at a holder: the direct-message envelope id
/// (SHA-256(to || body), first 16 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Id({})", hex::encode(self.0))
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Id {
    /// The id of an envelope.
    pub fn of(env: &Envelope) -> Self {
        Id(env.id().0)
    }
}

/// What a peer asks a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Keep this encoded direct-message envelope for its recipient.
    Deposit {
        /// The envelope frame, exactly as the recipient would get it.
        #[serde(rename = "e", with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// Hand over envelopes addressed to the asking peer.
    Fetch,
    /// Drop these envelopes (addressed to, or deposited by, the asking
    /// peer; others are left alone).
    Delete {
        /// Their ids, at most [`MAX_DELETE_IDS`].
        #[serde(rename = "i")]
        ids: Vec<Id>,
    },
}

/// One held envelope in a fetch answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Its id (what a delete names).
    #[serde(rename = "i")]
    pub id: Id,
    /// The envelope frame as deposited.
    #[serde(rename = "e", with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

/// Why a holder refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// This node holds nothing for others (`--no-mailbox`).
    Disabled,
    /// The holder's total quota is used up.
    Full,
    /// The depositor (or the recipient's mailbox) is over its share.
    OverQuota,
    /// The envelope exceeds [`MAX_DEPOSIT`].
    TooLarge,
    /// The request or its envelope does not decode.
    Malformed,
    /// Too many requests from this peer now: try later.
    Busy,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Disabled => "holds no mail for others",
            Refusal::Full => "full",
            Refusal::OverQuota => "over quota",
            Refusal::TooLarge => "envelope too large",
            Refusal::Malformed => "malformed",
            Refusal::Busy => "busy",
        })
    }
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The envelope is durably held (or already was).
    Deposited,
    /// Refused, and why.
    Refused(Refusal),
    /// Envelopes for the asking peer; `more` when others wait.
    Fetched {
        /// At most [`MAX_FETCH_ITEMS`].
        #[serde(rename = "x")]
        items: Vec<Item>,
        /// More are held: fetch again after deleting these.
        #[serde(rename = "m")]
        more: bool,
    },
    /// How many of the named envelopes were dropped (others were not held,
    /// or not the asking peer's to drop).
    Deleted {
        /// The count.
        #[serde(rename = "n")]
        count: u32,
    },
}

impl Request {
    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(VERSION, self)
    }

    /// Decodes a frame of at most [`MAX_REQUEST`] bytes, with at most
    /// [`MAX_DELETE_IDS`] ids and a deposit of at most [`MAX_DEPOSIT`].
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let req: Request = decode(bytes, MAX_REQUEST, VERSION)?;
        match &req {
            Request::Deposit { envelope } if envelope.len() > MAX_DEPOSIT => {
                Err(WireError::TooLarge {
                    len: envelope.len(),
                    max: MAX_DEPOSIT,
                })
            }
            Request::Delete { ids } if ids.len() > MAX_DELETE_IDS => Err(WireError::TooLarge {
                len: ids.len(),
                max: MAX_DELETE_IDS,
            }),
            _ => Ok(req),
        }
    }
}

impl Response {
    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(VERSION, self)
    }

    /// Decodes a frame of at most [`MAX_RESPONSE`] bytes, with at most
    /// [`MAX_FETCH_ITEMS`] items of at most [`MAX_DEPOSIT`] each.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let resp: Response = decode(bytes, MAX_RESPONSE, VERSION)?;
        if let Response::Fetched { items, .. } = &resp {
            if items.len() > MAX_FETCH_ITEMS {
                return Err(WireError::TooLarge {
                    len: items.len(),
                    max: MAX_FETCH_ITEMS,
                });
            }
            if let Some(big) = items.iter().find(|i| i.envelope.len() > MAX_DEPOSIT) {
                return Err(WireError::TooLarge {
                    len: big.envelope.len(),
                    max: MAX_DEPOSIT,
                });
            }
        }
        Ok(resp)
    }
}

/// Decodes a deposited (or fetched) envelope: at most [`MAX_DEPOSIT`]
/// bytes, checked before parsing.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, WireError> {
    if bytes.len() > MAX_DEPOSIT {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_DEPOSIT,
        });
    }
    Envelope::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::PeerId;

    fn env(len: usize) -> Envelope {
        Envelope {
            to: PeerId::random(),
            ttl: 7,
            body: vec![3; len],
        }
    }

    #[test]
    fn frames_round_trip() {
        let e = env(600);
        let reqs = [
            Request::Deposit {
                envelope: e.encode(),
            },
            Request::Fetch,
            Request::Delete {
                ids: vec![Id::of(&e)],
            },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()).expect("decodes"), r);
        }
        let resps = [
            Response::Deposited,
            Response::Refused(Refusal::OverQuota),
            Response::Fetched {
                items: vec![Item {
                    id: Id::of(&e),
                    envelope: e.encode(),
                }],
                more: true,
            },
            Response::Deleted { count: 2 },
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode()).expect("decodes"), r);
        }
    }

    #[test]
    fn oversized_deposits_and_deletes_are_refused_before_use() {
        let big = Request::Deposit {
            envelope: vec![0; MAX_DEPOSIT + 1],
        };
        assert!(matches!(
            Request::decode(&big.encode()),
            Err(WireError::TooLarge { .. })
        ));
        let many = Request::Delete {
            ids: vec![Id([0; 16]); MAX_DELETE_IDS + 1],
        };
        assert!(matches!(
            Request::decode(&many.encode()),
            Err(WireError::TooLarge { .. })
        ));
        assert!(decode_envelope(&env(MAX_DEPOSIT).encode()).is_err());
        assert!(decode_envelope(&env(8192 + 48).encode()).is_ok());
        assert!(Request::decode(&[0xff; 10]).is_err());
        assert!(Response::decode(&[]).is_err());
    }
}
