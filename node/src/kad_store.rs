//! Kademlia's record store: our own provider records without a cap, the
//! ones held for other peers bounded.
//!
//! A DHT server stores what any peer announces with ADD_PROVIDER. With
//! libp2p's `MemoryStore` one cap (`max_provided_keys`) covers both the
//! node's own records (one per shared file, so it must be large) and those
//! of others, each with up to a packet's worth (16 KiB) of addresses: a
//! stranger could fill memory. [`ProviderStore`] keeps the node's own
//! records in a `MemoryStore` with a large cap and the others' in a map of
//! its own with tight limits:
//!
//! - at most [`MAX_RECORDS_FOR_OTHERS`] records in total, at most
//!   [`MAX_RECORDS_PER_PROVIDER`] from one provider (kad accepts a record
//!   only from the provider itself), at most [`MAX_PROVIDERS_PER_KEY`]
//!   providers per key;
//! - keys of at most [`MAX_KEY_LEN`] bytes (a file id is 32);
//! - at most [`MAX_ADDRS_PER_RECORD`] addresses of at most
//!   [`MAX_ADDR_LEN`] bytes each (longer ones are dropped, the rest
//!   truncated);
//! - when full, expired records are dropped first; a new record that still
//!   does not fit is refused (never one already held: a flood cannot push
//!   honest records out).
//!
//! Value records (PUT_VALUE) are refused: fogmesh uses none.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;
use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};

/// Provider records held for other peers, in total.
pub const MAX_RECORDS_FOR_OTHERS: usize = 4096;
/// Provider records held for one other peer.
pub const MAX_RECORDS_PER_PROVIDER: usize = 256;
/// Providers kept per key (Kademlia's replication factor).
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// Longest key accepted in a record for another peer, bytes.
pub const MAX_KEY_LEN: usize = 64;
/// Addresses kept per record for another peer.
pub const MAX_ADDRS_PER_RECORD: usize = 4;
/// Longest address kept (its binary encoding), bytes.
pub const MAX_ADDR_LEN: usize = 128;
/// The node's own provided keys (one per shared file): effectively
/// unlimited.
pub const MAX_OWN_PROVIDED_KEYS: usize = 1 << 20;

/// See the [module docs](self).
pub struct ProviderStore {
    local: PeerId,
    /// The node's own provider records (and nothing else).
    own: MemoryStore,
    /// Records of other providers, by key.
    others: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// Records held per other provider.
    per_provider: HashMap<PeerId, usize>,
    /// Records in `others`.
    others_len: usize,
    limits: Limits,
}

impl std::fmt::Debug for ProviderStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderStore")
            .field("own", &self.own.provided().count())
            .field("others", &self.others_len)
            .finish_non_exhaustive()
    }
}

/// The store's limits (the constants above, smaller in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    total: usize,
    per_provider: usize,
    per_key: usize,
}

impl ProviderStore {
    /// An empty store for the node `local`.
    pub fn new(local: PeerId) -> Self {
        Self::with_limits(
            local,
            Limits {
                total: MAX_RECORDS_FOR_OTHERS,
                per_provider: MAX_RECORDS_PER_PROVIDER,
                per_key: MAX_PROVIDERS_PER_KEY,
            },
        )
    }

    fn with_limits(local: PeerId, limits: Limits) -> Self {
        let cfg = MemoryStoreConfig {
            max_records: 0,
            max_provided_keys: MAX_OWN_PROVIDED_KEYS,
            max_providers_per_key: 1,
            ..Default::default()
        };
        ProviderStore {
            local,
            own: MemoryStore::with_config(local, cfg),
            others: HashMap::new(),
            per_provider: HashMap::new(),
            others_len: 0,
            limits,
        }
    }

    /// Provider records held for other peers now.
    pub fn records_for_others(&self) -> usize {
        self.others_len
    }

    fn add_for_other(&mut self, mut record: ProviderRecord) -> store::Result<()> {
        if record.key.as_ref().len() > MAX_KEY_LEN {
            return Err(store::Error::ValueTooLarge);
        }
        record.addresses.retain(|a| a.len() <= MAX_ADDR_LEN);
        record.addresses.truncate(MAX_ADDRS_PER_RECORD);
        record.addresses.shrink_to_fit();
        if let Some(held) = self
            .others
            .get_mut(&record.key)
            .and_then(|rs| rs.iter_mut().find(|r| r.provider == record.provider))
        {
            // A refresh: replaces the record, takes no new room.
            *held = record;
            return Ok(());
        }
        if self.others_len >= self.limits.total
            || self.count_of(&record.provider) >= self.limits.per_provider
            || self.providers_of(&record.key) >= self.limits.per_key
        {
            self.drop_expired(Instant::now());
        }
        if self.others_len >= self.limits.total
            || self.count_of(&record.provider) >= self.limits.per_provider
        {
            return Err(store::Error::MaxProvidedKeys);
        }
        if self.providers_of(&record.key) >= self.limits.per_key {
            // Like MemoryStore: a full key ignores new providers.
            return Ok(());
        }
        *self.per_provider.entry(record.provider).or_default() += 1;
        self.others_len += 1;
        self.others
            .entry(record.key.clone())
            .or_default()
            .push(record);
        Ok(())
    }

    fn count_of(&self, provider: &PeerId) -> usize {
        self.per_provider.get(provider).copied().unwrap_or(0)
    }

    fn providers_of(&self, key: &RecordKey) -> usize {
        self.others.get(key).map_or(0, Vec::len)
    }

    fn drop_expired(&mut self, now: Instant) {
        let mut dropped = Vec::new();
        self.others.retain(|_, rs| {
            rs.retain(|r| {
                let expired = r.is_expired(now);
                if expired {
                    dropped.push(r.provider);
                }
                !expired
            });
            !rs.is_empty()
        });
        for p in dropped {
            self.forget_one(&p);
        }
    }

    fn forget_one(&mut self, provider: &PeerId) {
        self.others_len = self.others_len.saturating_sub(1);
        if let Some(n) = self.per_provider.get_mut(provider) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_provider.remove(provider);
            }
        }
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = std::iter::Empty<Cow<'a, Record>>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, _k: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    fn put(&mut self, _r: Record) -> store::Result<()> {
        Err(store::Error::MaxRecords)
    }

    fn remove(&mut self, _k: &RecordKey) {}

    fn records(&self) -> Self::RecordsIter<'_> {
        std::iter::empty()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if record.provider == self.local {
            self.own.add_provider(record)
        } else {
            self.add_for_other(record)
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut all = self.own.providers(key);
        if let Some(rs) = self.others.get(key) {
            all.extend(rs.iter().cloned());
        }
        all
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.provided()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        if *provider == self.local {
            return self.own.remove_provider(key, provider);
        }
        let Some(rs) = self.others.get_mut(key) else {
            return;
        };
        let before = rs.len();
        rs.retain(|r| r.provider != *provider);
        let removed = before - rs.len();
        if rs.is_empty() {
            self.others.remove(key);
        }
        for _ in 0..removed {
            self.forget_one(provider);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::Multiaddr;

    use super::*;

    fn key(i: usize) -> RecordKey {
        RecordKey::new(&sha2_like(i))
    }

    fn sha2_like(i: usize) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64).to_be_bytes());
        k
    }

    fn record(i: usize, provider: PeerId, addrs: usize) -> ProviderRecord {
        let addrs = (0..addrs)
            .map(|p| {
                format!("/ip4/10.0.0.1/tcp/{}", 1000 + p)
                    .parse::<Multiaddr>()
                    .expect("multiaddr")
            })
            .collect();
        ProviderRecord::new(key(i), provider, addrs)
    }

    fn small(local: PeerId) -> ProviderStore {
        ProviderStore::with_limits(
            local,
            Limits {
                total: 100,
                per_provider: 30,
                per_key: 3,
            },
        )
    }

    #[test]
    fn own_records_are_not_capped() {
        let me = PeerId::random();
        let mut s = small(me);
        for i in 0..1000 {
            s.add_provider(record(i, me, 2)).expect("own record");
        }
        assert_eq!(s.provided().count(), 1000);
        assert_eq!(s.records_for_others(), 0);
        assert_eq!(s.providers(&key(7)).len(), 1);
    }

    #[test]
    fn a_flood_from_many_providers_stops_at_the_cap() {
        let mut s = small(PeerId::random());
        let flooders: Vec<PeerId> = (0..20).map(|_| PeerId::random()).collect();
        let mut refused = 0;
        for (n, p) in flooders.iter().enumerate() {
            for i in 0..50 {
                if s.add_provider(record(n * 1000 + i, *p, 1)).is_err() {
                    refused += 1;
                }
            }
        }
        assert_eq!(s.records_for_others(), 100);
        assert_eq!(refused, 20 * 50 - 100);
        let held: usize = s.others.values().map(Vec::len).sum();
        assert_eq!(held, 100);
        // Our own records still go in.
        let me = s.local;
        s.add_provider(record(1, me, 1)).expect("own record");
    }

    #[test]
    fn one_provider_gets_at_most_its_share() {
        let mut s = small(PeerId::random());
        let p = PeerId::random();
        let ok = (0..100)
            .filter(|i| s.add_provider(record(*i, p, 1)).is_ok())
            .count();
        assert_eq!(ok, 30);
        // A refresh of a held record is still accepted.
        s.add_provider(record(0, p, 1)).expect("refresh");
        assert_eq!(s.records_for_others(), 30);
        // Removing frees the room again.
        s.remove_provider(&key(0), &p);
        assert_eq!(s.records_for_others(), 29);
        s.add_provider(record(500, p, 1)).expect("room again");
    }

    #[test]
    fn addresses_are_truncated_and_long_keys_refused() {
        let mut s = small(PeerId::random());
        let p = PeerId::random();
        s.add_provider(record(1, p, 50)).expect("stored");
        let held = s.providers(&key(1));
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].addresses.len(), MAX_ADDRS_PER_RECORD);
        let long = ProviderRecord::new(RecordKey::new(&vec![7u8; 1000]), p, Vec::new());
        assert!(s.add_provider(long).is_err());
        assert_eq!(s.records_for_others(), 1);
    }

    #[test]
    fn a_full_key_keeps_its_first_providers() {
        let mut s = small(PeerId::random());
        for _ in 0..10 {
            s.add_provider(record(1, PeerId::random(), 1)).expect("ok");
        }
        assert_eq!(s.providers(&key(1)).len(), 3);
        assert_eq!(s.records_for_others(), 3);
    }

    #[test]
    fn expired_records_make_room() {
        let mut s = small(PeerId::random());
        for n in 0..4 {
            let p = PeerId::random();
            for i in 0..25 {
                let mut r = record(n * 100 + i, p, 1);
                r.expires = Some(Instant::now() - Duration::from_secs(1));
                s.add_provider(r).expect("room");
            }
        }
        assert_eq!(s.records_for_others(), 100);
        s.add_provider(record(9999, PeerId::random(), 1))
            .expect("expired ones dropped");
        assert_eq!(s.records_for_others(), 1);
        assert!(s.per_provider.len() == 1);
    }

    #[test]
    fn value_records_are_refused() {
        let mut s = small(PeerId::random());
        assert!(s.put(Record::new(key(1), vec![1; 10])).is_err());
        assert_eq!(s.records().count(), 0);
    }
}
