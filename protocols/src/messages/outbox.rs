//! One outgoing message's journey: which route to try next, when an
//! attempt has taken too long, when to try again, when to give up.
//!
//! A message gets its route plan from the policy when it is sent (the
//! user's explicit route, BLE when offline, onion when private, else the
//! fastest first). Attempts walk the plan in order: an attempt that cannot
//! start (no way to the peer on that route now) or fails moves on at
//! once; one that was handed over but brings no receipt within its route's
//! timeout moves on too, while its receipt is still welcome later. After
//! the last route, the message waits: until the node says something
//! changed for the peer ([`Outgoing::wake`]: a connection, a BLE
//! neighbour, a gateway) or a back-off passes (5 s doubling to 5 min), then
//! walks the plan again. A receipt for any attempt delivers it; past its
//! expiry it is given up. States only move forward:
//! queued -> sent -> delivered, or queued/sent -> expired.

use serde::{Deserialize, Serialize};

use crate::policy::Route;

/// Most attempts remembered per message (older ones are dropped).
pub const MAX_ATTEMPTS_KEPT: usize = 32;
/// First back-off after every route failed, ms.
pub const BACKOFF_MIN_MS: u64 = 5_000;
/// Longest back-off, ms.
pub const BACKOFF_MAX_MS: u64 = 300_000;

/// How long each route gets to bring a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Internet (default 10 s).
    pub internet_ms: u64,
    /// BLE, across however many hops (default 30 s).
    pub ble_ms: u64,
    /// Onion (default 60 s).
    pub onion_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            internet_ms: 10_000,
            ble_ms: 30_000,
            onion_ms: 60_000,
        }
    }
}

impl Timeouts {
    /// The timeout of `route`.
    pub fn of(&self, route: Route) -> u64 {
        match route {
            Route::Internet => self.internet_ms,
            Route::Ble => self.ble_ms,
            Route::Onion => self.onion_ms,
        }
    }
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutState {
    /// Durable here, not yet handed to any route.
    Queued,
    /// Handed to a route (a first hop accepted it); no receipt yet.
    Sent,
    /// The recipient's signed receipt arrived.
    Delivered,
    /// Given up after its lifetime.
    Expired,
}

impl OutState {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            OutState::Queued => "queued",
            OutState::Sent => "sent",
            OutState::Delivered => "delivered",
            OutState::Expired => "expired",
        }
    }
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Started; no answer from the first hop yet.
    Pending,
    /// A first hop accepted it; waiting for the receipt.
    Sent,
    /// This route could not start now (why).
    Unavailable(String),
    /// The first hop refused it or the exchange failed (why).
    Failed(String),
    /// Accepted, but no receipt within the route's timeout.
    TimedOut,
    /// The receipt names this attempt.
    Delivered,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its number (the letter carries it; the receipt echoes it).
    pub n: u32,
    /// The route.
    pub route: Route,
    /// When it started, ms since the Unix epoch.
    pub at_ms: u64,
    /// What became of it.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What the node should do for this message now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Seal attempt `n` and hand it to `route`.
    Try {
        /// The attempt's number.
        n: u32,
        /// The route.
        route: Route,
    },
    /// Attempt `n` on `route` brought no receipt in time (the next step
    /// comes from the next poll): the route may be dead.
    TimedOut {
        /// The attempt's number.
        n: u32,
        /// Its route.
        route: Route,
    },
    /// The message just expired.
    Expired,
}

/// One outgoing message's route state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The routes to try, in order (empty: none can carry it; it waits).
    pub plan: Vec<Route>,
    /// Why the plan is empty, when it is.
    pub plan_note: Option<String>,
    /// Where it stands.
    pub state: OutState,
    /// The attempts, oldest first (at most [`MAX_ATTEMPTS_KEPT`]).
    pub attempts: Vec<Attempt>,
    /// The route that delivered it.
    pub delivered_by: Option<Route>,
    /// Index into `plan` of the next route to try.
    next: usize,
    /// The attempt waiting for its receipt and its deadline.
    in_flight: Option<(u32, u64)>,
    /// Number of the next attempt.
    next_attempt: u32,
    /// Plan walks that ended with every route failing, in a row.
    rounds_failed: u32,
    /// When to walk the plan again.
    pub retry_at_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// Why it waits, for the user.
    pub waiting: Option<String>,
}

impl Outgoing {
    /// A new message with its plan, created at `now`, living `ttl_ms`.
    pub fn new(plan: Vec<Route>, plan_note: Option<String>, now: u64, ttl_ms: u64) -> Self {
        let waiting = if plan.is_empty() {
            plan_note.clone()
        } else {
            None
        };
        Outgoing {
            plan,
            plan_note,
            state: OutState::Queued,
            attempts: Vec::new(),
            delivered_by: None,
            next: 0,
            in_flight: None,
            next_attempt: 0,
            rounds_failed: 0,
            retry_at_ms: now,
            expires_at_ms: now.saturating_add(ttl_ms),
            waiting,
        }
    }

    /// Delivered or expired: nothing more to do.
    pub fn is_final(&self) -> bool {
        matches!(self.state, OutState::Delivered | OutState::Expired)
    }

    /// The next time [`Outgoing::poll`] has something to do.
    pub fn deadline(&self) -> Option<u64> {
        if self.is_final() {
            return None;
        }
        let mut d = self.expires_at_ms;
        match self.in_flight {
            Some((_, t)) => d = d.min(t),
            None if !self.plan.is_empty() => d = d.min(self.retry_at_ms),
            None => {}
        }
        Some(d)
    }

    /// Advances time: expiry, attempt timeouts, the next attempt. Call
    /// until it returns `None`.
    pub fn poll(&mut self, now: u64, timeouts: &Timeouts) -> Option<Step> {
        if self.is_final() {
            return None;
        }
        if now >= self.expires_at_ms {
            self.state = OutState::Expired;
            self.in_flight = None;
            self.waiting = None;
            return Some(Step::Expired);
        }
        if let Some((n, deadline)) = self.in_flight {
            if now < deadline {
                return None;
            }
            self.set_outcome(n, Outcome::TimedOut);
            self.in_flight = None;
            self.advance(now);
            let route = self.attempt(n).map_or(self.plan[0], |a| a.route);
            return Some(Step::TimedOut { n, route });
        }
        if self.plan.is_empty() || now < self.retry_at_ms {
            return None;
        }
        let route = self.plan[self.next % self.plan.len()];
        let n = self.next_attempt;
        self.next_attempt += 1;
        self.attempts.push(Attempt {
            n,
            route,
            at_ms: now,
            outcome: Outcome::Pending,
        });
        if self.attempts.len() > MAX_ATTEMPTS_KEPT {
            self.attempts.remove(0);
        }
        self.in_flight = Some((n, now.saturating_add(timeouts.of(route))));
        self.waiting = None;
        Some(Step::Try { n, route })
    }

    /// Attempt `n` could not start on its route now.
    pub fn unavailable(&mut self, n: u32, why: String, now: u64) {
        self.end_attempt(n, Outcome::Unavailable(why), now);
    }

    /// Attempt `n` was refused or its exchange failed.
    pub fn failed(&mut self, n: u32, why: String, now: u64) {
        self.end_attempt(n, Outcome::Failed(why), now);
    }

    /// A first hop accepted attempt `n`.
    pub fn sent(&mut self, n: u32) {
        if self.is_final() {
            return;
        }
        if self.attempt(n).map(|a| &a.outcome) == Some(&Outcome::Pending) {
            self.set_outcome(n, Outcome::Sent);
        }
        if self.state == OutState::Queued {
            self.state = OutState::Sent;
        }
    }

    /// The recipient's receipt for attempt `n` arrived. Returns whether
    /// this delivered the message (false if it already was).
    pub fn receipt(&mut self, n: u32) -> bool {
        if self.state == OutState::Delivered {
            return false;
        }
        // A receipt after expiry still counts: the recipient has it.
        self.state = OutState::Delivered;
        self.delivered_by = self.attempt(n).map(|a| a.route);
        self.set_outcome(n, Outcome::Delivered);
        self.in_flight = None;
        self.waiting = None;
        true
    }

    /// Something changed that may give a route to the peer: try again now
    /// (an attempt waiting for its receipt keeps waiting).
    pub fn wake(&mut self, now: u64) {
        if !self.is_final() && self.in_flight.is_none() {
            self.retry_at_ms = self.retry_at_ms.min(now);
        }
    }

    /// The node restarted: an attempt that was in flight is gone with the
    /// process (its receipt is still welcome); walk the plan again now.
    pub fn restart(&mut self, now: u64) {
        if self.is_final() {
            return;
        }
        if let Some((n, _)) = self.in_flight.take()
            && let Some(a) = self.attempts.iter_mut().find(|a| a.n == n)
            && a.outcome == Outcome::Pending
        {
            a.outcome = Outcome::Failed("interrupted by a restart".into());
        }
        self.next = 0;
        self.retry_at_ms = now;
    }

    fn attempt(&self, n: u32) -> Option<&Attempt> {
        self.attempts.iter().find(|a| a.n == n)
    }

    fn set_outcome(&mut self, n: u32, outcome: Outcome) {
        if let Some(a) = self.attempts.iter_mut().find(|a| a.n == n) {
            a.outcome = outcome;
        }
    }

    fn end_attempt(&mut self, n: u32, outcome: Outcome, now: u64) {
        if self.is_final() {
            return;
        }
        // A late failure of an attempt that already timed out changes
        // nothing but its record.
        let current = self.in_flight.map(|(m, _)| m) == Some(n);
        if let Some(a) = self.attempts.iter_mut().find(|a| a.n == n)
            && matches!(a.outcome, Outcome::Pending | Outcome::Sent)
        {
            a.outcome = outcome.clone();
        }
        if current {
            self.in_flight = None;
            if let Outcome::Unavailable(why) | Outcome::Failed(why) = &outcome {
                self.waiting = Some(why.clone());
            }
            self.advance(now);
        }
    }

    /// Moves to the next route; after the last, waits with back-off.
    fn advance(&mut self, now: u64) {
        self.next += 1;
        if self.next >= self.plan.len() {
            self.next = 0;
            let backoff = BACKOFF_MIN_MS
                .saturating_mul(1u64 << self.rounds_failed.min(16))
                .min(BACKOFF_MAX_MS);
            self.rounds_failed = self.rounds_failed.saturating_add(1);
            self.retry_at_ms = now.saturating_add(backoff);
        } else {
            self.retry_at_ms = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        internet_ms: 10_000,
        ble_ms: 30_000,
        onion_ms: 60_000,
    };
    const DAY: u64 = 86_400_000;

    fn both() -> Outgoing {
        Outgoing::new(vec![Route::Internet, Route::Ble], None, 0, DAY)
    }

    #[test]
    fn a_receipt_delivers_on_the_first_route() {
        let mut o = both();
        assert_eq!(
            o.poll(0, &T),
            Some(Step::Try {
                n: 0,
                route: Route::Internet
            })
        );
        o.sent(0);
        assert_eq!(o.state, OutState::Sent);
        assert!(o.receipt(0));
        assert_eq!(o.state, OutState::Delivered);
        assert_eq!(o.delivered_by, Some(Route::Internet));
        assert_eq!(o.poll(1, &T), None);
        assert!(!o.receipt(0), "delivered once");
    }

    #[test]
    fn no_receipt_in_time_fails_over_to_the_next_route() {
        let mut o = both();
        o.poll(0, &T);
        o.sent(0);
        assert_eq!(o.poll(9_999, &T), None);
        assert_eq!(o.deadline(), Some(10_000));
        assert_eq!(
            o.poll(10_000, &T),
            Some(Step::TimedOut {
                n: 0,
                route: Route::Internet
            })
        );
        assert_eq!(
            o.poll(10_000, &T),
            Some(Step::Try {
                n: 1,
                route: Route::Ble
            })
        );
        assert_eq!(o.attempts[0].outcome, Outcome::TimedOut);
        // The late receipt of the first attempt still delivers, by internet.
        assert!(o.receipt(0));
        assert_eq!(o.delivered_by, Some(Route::Internet));
    }

    #[test]
    fn unavailable_routes_are_skipped_then_the_message_waits_with_backoff() {
        let mut o = both();
        o.poll(0, &T);
        o.unavailable(0, "not connected".into(), 0);
        assert_eq!(
            o.poll(0, &T),
            Some(Step::Try {
                n: 1,
                route: Route::Ble
            })
        );
        o.unavailable(1, "no BLE neighbours".into(), 0);
        assert_eq!(o.poll(0, &T), None);
        assert_eq!(o.waiting.as_deref(), Some("no BLE neighbours"));
        assert_eq!(o.deadline(), Some(BACKOFF_MIN_MS));
        // A new connection wakes it before the back-off ends.
        o.wake(100);
        assert_eq!(
            o.poll(100, &T),
            Some(Step::Try {
                n: 2,
                route: Route::Internet
            })
        );
        o.failed(2, "refused".into(), 100);
        o.poll(100, &T);
        o.unavailable(3, "x".into(), 100);
        // Second round failed: the back-off doubles.
        assert_eq!(o.deadline(), Some(100 + 2 * BACKOFF_MIN_MS));
    }

    #[test]
    fn it_expires_and_never_goes_back() {
        let mut o = both();
        o.poll(0, &T);
        o.sent(0);
        assert_eq!(o.poll(DAY, &T), Some(Step::Expired));
        assert_eq!(o.state, OutState::Expired);
        assert_eq!(o.poll(DAY + 1, &T), None);
        o.sent(0);
        assert_eq!(o.state, OutState::Expired);
    }

    #[test]
    fn an_empty_plan_waits_with_its_reason_until_expiry() {
        let mut o = Outgoing::new(Vec::new(), Some("no privacy route".into()), 0, DAY);
        assert_eq!(o.poll(0, &T), None);
        assert_eq!(o.waiting.as_deref(), Some("no privacy route"));
        assert_eq!(o.deadline(), Some(DAY));
        assert_eq!(o.poll(DAY, &T), Some(Step::Expired));
    }

    #[test]
    fn attempts_kept_are_bounded() {
        let mut o = Outgoing::new(vec![Route::Internet], None, 0, u64::MAX);
        for i in 0..100 {
            o.wake(i);
            if let Some(Step::Try { n, .. }) = o.poll(i, &T) {
                o.unavailable(n, "down".into(), i);
            }
        }
        assert!(o.attempts.len() <= MAX_ATTEMPTS_KEPT);
    }
}
