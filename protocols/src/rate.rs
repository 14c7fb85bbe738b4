//! Rate limits: parsing rates like `20MiB/s` and the one sans-IO token
//! bucket every limit of the node uses.
//!
//! The node reads upload and download limits from its config and command
//! line with [`parse_rate`], and paces chunk responses (or requests) with a
//! [`TokenBucket`]: it asks the bucket before sending and, when told to
//! wait, sets a timer for exactly that long. Per-peer message limits (group
//! gossip, invitation fetches) use the same bucket with a unit of one
//! message. The bucket never reads the clock; the caller passes `now`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Why a rate could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateError {
    /// Nothing but blanks.
    #[error("empty rate")]
    Empty,
    /// The number part is missing or not a number.
    #[error("invalid number in rate {0:?}: expected digits, e.g. 20MiB or 1.5M/s")]
    InvalidNumber(String),
    /// The unit is not one of B, K, M, G, KB, MB, GB, KiB, MiB, GiB.
    #[error(
        "unknown unit {0:?}: use B, K, M, G (powers of 1000) or KiB, MiB, GiB (powers of 1024)"
    )]
    UnknownUnit(String),
    /// The rate does not fit in 64 bits of bytes per second.
    #[error("rate {0:?} is too large")]
    Overflow(String),
}

/// Parses a rate in bytes per second.
///
/// Accepts a number (digits, optionally with a fractional part such as
/// `1.5`), optional blanks, an optional unit and an optional `/s`. Units,
/// case-insensitively: none or `B` (bytes), `K`/`KB`, `M`/`MB`, `G`/`GB`
/// (powers of 1000), `KiB`, `MiB`, `GiB` (powers of 1024). Fractions of a
/// byte are rounded down. `0` is accepted; what it means is the caller's
/// business.
///
/// ```
/// use fogmesh_protocols::rate::parse_rate;
/// assert_eq!(parse_rate("20MiB"), Ok(20 * 1024 * 1024));
/// assert_eq!(parse_rate("1.5 M/s"), Ok(1_500_000));
/// ```
pub fn parse_rate(input: &str) -> Result<u64, RateError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(RateError::Empty);
    }
    // "/s" is the only suffix; strip it before splitting number and unit.
    let s = match s.len().checked_sub(2).and_then(|i| s.get(i..)) {
        Some(tail) if tail.eq_ignore_ascii_case("/s") => s[..s.len() - 2].trim_end(),
        _ => s,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim_start();
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    // "5.", ".5" and "." are refused along with "1.2.3": a rate should not
    // look like a typo.
    if int.is_empty() || !digits_only(int) || !digits_only(frac) || number.ends_with('.') {
        return Err(RateError::InvalidNumber(input.to_string()));
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(RateError::UnknownUnit(unit.to_string())),
    };
    let overflow = || RateError::Overflow(input.to_string());
    let whole = int
        .parse::<u64>()
        .map_err(|_| overflow())?
        .checked_mul(multiplier)
        .ok_or_else(overflow)?;
    // The fraction, exactly: frac_digits * multiplier / 10^len, in u128 so
    // that up to 19 digits cannot overflow; more digits cannot matter.
    let frac = &frac[..frac.len().min(19)];
    let part = if frac.is_empty() {
        0
    } else {
        let f = frac.parse::<u128>().map_err(|_| overflow())?;
        let scale = 10u128.pow(frac.len() as u32);
        u64::try_from(f * u128::from(multiplier) / scale).map_err(|_| overflow())?
    };
    whole.checked_add(part).ok_or_else(overflow)
}

/// Nanoseconds per second: tokens are kept in units of 1e-9 byte so that
/// refilling by elapsed nanoseconds times the rate is exact.
const NANOS: i128 = 1_000_000_000;

/// A token bucket: `rate` bytes per second on average, bursts of up to
/// `burst` bytes.
///
/// A take larger than `burst` waits for a full bucket and then leaves it in
/// debt, so the long-run rate holds even for chunks larger than the burst.
/// The bucket starts full on its first use.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens, in 1e-9 bytes; negative while in debt.
    tokens: i128,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A bucket refilling at `rate` bytes per second up to `burst` bytes.
    /// With a rate of 0 the bucket never refills.
    pub fn new(rate: u64, burst: u64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: i128::from(burst) * NANOS,
            last: None,
        }
    }

    /// The refill rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The bucket's capacity in bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Changes the rate, keeping the tokens accumulated so far.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
    }

    fn refill(&mut self, now: Instant) {
        let last = *self.last.get_or_insert(now);
        // A `now` earlier than a previous one (callers mixing clocks) adds
        // nothing rather than panicking.
        let elapsed = now.saturating_duration_since(last).as_nanos();
        let cap = i128::from(self.burst) * NANOS;
        let added = i128::try_from(elapsed)
            .unwrap_or(i128::MAX)
            .saturating_mul(i128::from(self.rate));
        self.tokens = self.tokens.saturating_add(added).min(cap);
        self.last = Some(now.max(last));
    }

    /// Takes `n` bytes' worth of tokens, or says how long to wait before
    /// trying again (`Duration::MAX` if the bucket can never satisfy it).
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        // More than the bucket holds: wait for a full bucket, then go into debt.
        let needed = i128::from(n.min(self.burst)) * NANOS;
        if self.tokens >= needed {
            self.tokens -= i128::from(n) * NANOS;
            return Ok(());
        }
        if self.rate == 0 {
            return Err(Duration::MAX);
        }
        // deficit / rate is in nanoseconds; round up so that waiting exactly
        // this long is always enough.
        let deficit = needed - self.tokens;
        let rate = i128::from(self.rate);
        let nanos = (deficit + rate - 1) / rate;
        Err(u64::try_from(nanos).map_or(Duration::MAX, Duration::from_nanos))
    }
}

/// Milli-messages: the unit of per-peer message buckets, so that a rate
/// below one message a second keeps its meaning.
pub const MILLI: u64 = 1000;

/// A bucket passing `rate` messages a second, sustained, and bursts of four
/// times as many; take [`MILLI`] per message.
///
/// Counted in milli-messages and rounded to the nearest, never to zero: a
/// rate of 0.25/s passes one message every 4 s. A burst below one message
/// still passes one when the bucket is full (the bucket then goes into
/// debt), so any positive rate lets messages through at that rate.
pub fn message_bucket(rate: f64) -> TokenBucket {
    let milli = |r: f64| ((r * MILLI as f64).round() as u64).max(1);
    TokenBucket::new(milli(rate), milli(rate * 4.0))
}

/// One token bucket per key (a peer, a sender), at most `capacity` keys:
/// a new key beyond that starts the table over, which costs each key one
/// fresh burst, and keeps the memory a flood of keys can take bounded.
#[derive(Debug, Clone)]
pub struct RateTable<K> {
    buckets: HashMap<K, TokenBucket>,
    capacity: usize,
}

impl<K: Eq + Hash> RateTable<K> {
    /// An empty table of at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        RateTable {
            buckets: HashMap::new(),
            capacity,
        }
    }

    /// Takes `n` from `key`'s bucket (made by `make` on the key's first
    /// use); whether it had them.
    pub fn try_take(
        &mut self,
        key: K,
        n: u64,
        now: Instant,
        make: impl FnOnce() -> TokenBucket,
    ) -> bool {
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            self.buckets.clear();
        }
        self.buckets
            .entry(key)
            .or_insert_with(make)
            .try_take(n, now)
            .is_ok()
    }

    /// Forgets `key`'s bucket.
    pub fn remove(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_suffixes() {
        let cases = [
            ("0", 0),
            ("1234", 1234),
            ("20MiB", 20 << 20),
            ("20mib/s", 20 << 20),
            ("20 MiB/s", 20 << 20),
            (" 3KiB ", 3072),
            ("1GiB", 1 << 30),
            ("5k", 5000),
            ("5K/S", 5000),
            ("5KB", 5000),
            ("7M", 7_000_000),
            ("2G", 2_000_000_000),
            ("100B", 100),
            ("1.5M", 1_500_000),
            ("0.5KiB", 512),
            ("1.0001K", 1000),
            ("18446744073709551615", u64::MAX),
            ("17179869183GiB", 17179869183 << 30),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert_eq!(parse_rate(""), Err(RateError::Empty));
        assert_eq!(parse_rate("  "), Err(RateError::Empty));
        for s in ["MiB", "-5", "+5", "1.2.3", "5.", ".5", "/s", "1e6", "½M"] {
            assert!(
                matches!(
                    parse_rate(s),
                    Err(RateError::InvalidNumber(_) | RateError::UnknownUnit(_))
                ),
                "{s}: {:?}",
                parse_rate(s)
            );
        }
        for s in ["5 TiB", "5Mi", "5 mbit", "5M/h", "5M/s/s", "5 M B"] {
            assert!(
                matches!(parse_rate(s), Err(RateError::UnknownUnit(_))),
                "{s}"
            );
        }
        for s in [
            "18446744073709551616",
            "17179869184GiB",
            "99999999999999999999999K",
            "18446744073709551615.9K",
        ] {
            assert!(matches!(parse_rate(s), Err(RateError::Overflow(_))), "{s}");
        }
        let msg = parse_rate("5 TiB").err().map(|e| e.to_string());
        assert!(msg.is_some_and(|m| m.contains("MiB")));
    }

    #[test]
    fn bucket_allows_a_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500);
        assert_eq!(b.try_take(500, t0), Ok(()));
        // Empty: 100 bytes take 100 ms at 1000 B/s.
        assert_eq!(b.try_take(100, t0), Err(Duration::from_millis(100)));
        assert_eq!(
            b.try_take(100, t0 + Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert_eq!(b.try_take(100, t0 + Duration::from_millis(100)), Ok(()));
        // Refill is capped at the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.try_take(500, later), Ok(()));
        assert!(b.try_take(1, later).is_err());
    }

    #[test]
    fn long_run_rate_holds_for_takes_larger_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100);
        let mut now = t0;
        let mut sent = 0u64;
        // Take 250-byte chunks as fast as allowed for 10 s.
        while now < t0 + Duration::from_secs(10) {
            match b.try_take(250, now) {
                Ok(()) => sent += 250,
                Err(wait) => {
                    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(350));
                    now += wait;
                }
            }
        }
        // 10 s at 1000 B/s plus the initial burst, within one chunk.
        assert!((10_000..=10_350).contains(&sent), "{sent}");
    }

    #[test]
    fn zero_rate_and_backwards_time() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(0, 10);
        assert_eq!(b.try_take(10, t0), Ok(()));
        assert_eq!(b.try_take(1, t0), Err(Duration::MAX));
        let mut b = TokenBucket::new(100, 10);
        assert_eq!(b.try_take(10, t0), Ok(()));
        // An earlier `now` neither panics nor refills.
        assert!(b.try_take(1, t0 - Duration::from_secs(5)).is_err());
        b.set_rate(1000, t0);
        assert_eq!(b.rate(), 1000);
        assert_eq!(b.try_take(1, t0), Err(Duration::from_millis(1)));
    }

    #[test]
    fn a_rate_table_holds_at_most_its_capacity() {
        let t0 = Instant::now();
        let mut t: RateTable<u32> = RateTable::new(3);
        for k in 0..10 {
            assert!(t.try_take(k, 1, t0, || TokenBucket::new(1, 1)));
            assert!(t.len() <= 3);
        }
        // A key's bucket is kept while the table has room.
        assert!(!t.try_take(9, 1, t0, || TokenBucket::new(1, 1)));
        t.remove(&9);
        assert!(t.try_take(9, 1, t0, || TokenBucket::new(1, 1)));
    }
}
