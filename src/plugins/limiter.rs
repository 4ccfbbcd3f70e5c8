//! Limiter state that outlives plugin calls, kept by the host.
//!
//! Request buckets are governor rate limiters (GCRA). Token buckets need what
//! governor does not offer — a reservation that is settled later against the
//! usage the engine reports — so they are a small bucket of our own: admission
//! takes the estimate atomically (a concurrent burst cannot overshoot), and
//! settlement gives back what was not used or takes what was used beyond it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Identifies a bucket: it belongs to a tenant and a plugin, optionally to
/// one API key; its rate is part of its identity so a config change starts a
/// fresh bucket instead of reinterpreting an old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub tenant: Arc<str>,
    pub plugin: Arc<str>,
    pub name: String,
    pub key_id: Option<String>,
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub retry_after: Duration,
}

impl Outcome {
    const ALLOWED: Outcome = Outcome {
        allowed: true,
        retry_after: Duration::ZERO,
    };
}

/// Buckets kept at most, per kind: plugins choose bucket names, so the
/// host bounds how many it will keep.
const MAX_BUCKETS: usize = 100_000;

#[derive(Default)]
pub struct Limiters {
    requests: Mutex<HashMap<BucketKey, Arc<DefaultDirectRateLimiter>>>,
    tokens: Mutex<HashMap<BucketKey, Arc<TokenBucket>>>,
}

impl Limiters {
    /// Take `units` from a request bucket.
    pub fn take_requests(&self, key: BucketKey, units: u32) -> Outcome {
        let (Some(rate), Some(burst)) =
            (NonZeroU32::new(key.per_minute), NonZeroU32::new(key.burst))
        else {
            return refused(Duration::from_secs(60));
        };
        let limiter = {
            let mut map = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= MAX_BUCKETS && !map.contains_key(&key) {
                tracing::warn!(tenant = %key.tenant, plugin = %key.plugin, "request bucket limit reached; refusing a new bucket");
                return refused(Duration::from_secs(60));
            }
            map.entry(key)
                .or_insert_with(|| {
                    Arc::new(RateLimiter::direct(
                        Quota::per_minute(rate).allow_burst(burst),
                    ))
                })
                .clone()
        };
        let Some(units) = NonZeroU32::new(units) else {
            return Outcome::ALLOWED;
        };
        match limiter.check_n(units) {
            Ok(Ok(())) => Outcome::ALLOWED,
            Ok(Err(not_until)) => refused(not_until.wait_time_from(DefaultClock::default().now())),
            // More units than the burst: can never pass; say when a full bucket would.
            Err(_) => refused(Duration::from_secs(60)),
        }
    }

    /// Reserve `estimate` tokens; the [`Reservation`] must be settled.
    pub fn reserve_tokens(&self, key: BucketKey, estimate: u32) -> (Outcome, Option<Reservation>) {
        if key.per_minute == 0 || key.burst == 0 {
            return (refused(Duration::from_secs(60)), None);
        }
        let bucket = {
            let mut map = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= MAX_BUCKETS && !map.contains_key(&key) {
                tracing::warn!(tenant = %key.tenant, plugin = %key.plugin, "token bucket limit reached; refusing a new bucket");
                return (refused(Duration::from_secs(60)), None);
            }
            map.entry(key.clone())
                .or_insert_with(|| Arc::new(TokenBucket::new(key.per_minute, key.burst)))
                .clone()
        };
        match bucket.reserve(estimate) {
            Ok(()) => (
                Outcome::ALLOWED,
                Some(Reservation {
                    bucket,
                    reserved: estimate,
                }),
            ),
            Err(wait) => (refused(wait), None),
        }
    }
}

fn refused(retry_after: Duration) -> Outcome {
    Outcome {
        allowed: false,
        retry_after,
    }
}

/// Tokens taken at admission, to be settled against real usage.
#[derive(Debug)]
pub struct Reservation {
    bucket: Arc<TokenBucket>,
    reserved: u32,
}

impl Reservation {
    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Replace the estimate by what the exchange really used.
    pub fn settle(self, used: u32) {
        self.bucket
            .adjust(f64::from(self.reserved) - f64::from(used));
    }
}

#[derive(Debug)]
struct TokenBucket {
    per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(per_minute: u32, burst: u32) -> Self {
        TokenBucket {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        let gained = now.duration_since(state.1).as_secs_f64() * self.per_sec;
        state.0 = (state.0 + gained).min(self.burst);
        state.1 = now;
    }

    /// Admit when the level covers the estimate — or, for an estimate above
    /// the burst, when the bucket is full (it then goes into debt), so that a
    /// large request is slowed, not refused forever.
    fn reserve(&self, n: u32) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut state);
        let need = f64::from(n).min(self.burst);
        if state.0 >= need {
            state.0 -= f64::from(n);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - state.0) / self.per_sec))
        }
    }

    fn adjust(&self, delta: f64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut state);
        state.0 = (state.0 + delta).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, per_minute: u32, burst: u32) -> BucketKey {
        BucketKey {
            tenant: "t".into(),
            plugin: "p".into(),
            name: name.into(),
            key_id: None,
            per_minute,
            burst,
        }
    }

    #[test]
    fn request_bucket_allows_the_burst_then_refuses_with_a_wait() {
        let l = Limiters::default();
        for _ in 0..5 {
            assert!(l.take_requests(key("r", 60, 5), 1).allowed);
        }
        let o = l.take_requests(key("r", 60, 5), 1);
        assert!(!o.allowed);
        assert!(o.retry_after > Duration::ZERO && o.retry_after <= Duration::from_secs(1));
    }

    #[test]
    fn token_reservations_settle_both_ways() {
        let l = Limiters::default();
        let (o, r) = l.reserve_tokens(key("t", 60, 1000), 800);
        assert!(o.allowed);
        // 200 left: a second 800 must wait.
        assert!(!l.reserve_tokens(key("t", 60, 1000), 800).0.allowed);
        // The first used only 100: 700 come back.
        r.unwrap().settle(100);
        let (o, r2) = l.reserve_tokens(key("t", 60, 1000), 800);
        assert!(o.allowed);
        // Used more than estimated: the bucket goes into debt.
        r2.unwrap().settle(1500);
        assert!(!l.reserve_tokens(key("t", 60, 1000), 1).0.allowed);
    }
}
