//! Per-key request quotas (cloud mode), on governor's GCRA limiter: a key may burst up to
//! `requests` at once, and regains one request every `window / requests`. So 100 per 60 s
//! means 100 immediately, then one more every 0.6 s.
//!
//! Keys sharing a quota share one keyed limiter; a key with its own quota (from its row) gets
//! the limiter of that quota.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_governor::governor::clock::{Clock, DefaultClock};
use actix_governor::governor::middleware::StateInformationMiddleware;
use actix_governor::governor::state::keyed::DefaultKeyedStateStore;
use actix_governor::governor::{Quota as GcraQuota, RateLimiter};

use crate::auth::KeyId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub requests: NonZeroU32,
    pub window: Duration,
}

impl Quota {
    fn gcra(self) -> GcraQuota {
        let period = self.window / self.requests.get();
        GcraQuota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| GcraQuota::per_second(self.requests))
            .allow_burst(self.requests)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { limit: u32, remaining: u32 },
    Limited { limit: u32, retry_after: Duration },
}

type KeyedLimiter =
    RateLimiter<KeyId, DefaultKeyedStateStore<KeyId>, DefaultClock, StateInformationMiddleware>;

#[derive(Default)]
pub struct KeyRateLimiter {
    by_quota: RwLock<HashMap<Quota, Arc<KeyedLimiter>>>,
}

impl KeyRateLimiter {
    pub fn check(&self, key: &KeyId, quota: Quota) -> Decision {
        let limiter = self.limiter(quota);
        let limit = quota.requests.get();
        match limiter.check_key(key) {
            Ok(state) => Decision::Allowed {
                limit,
                remaining: state.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Limited {
                limit,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
        }
    }

    fn limiter(&self, quota: Quota) -> Arc<KeyedLimiter> {
        let read = self.by_quota.read().unwrap_or_else(|e| e.into_inner());
        if let Some(limiter) = read.get(&quota) {
            return Arc::clone(limiter);
        }
        drop(read);
        let mut write = self.by_quota.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(write.entry(quota).or_insert_with(|| {
            Arc::new(
                RateLimiter::keyed(quota.gcra()).with_middleware::<StateInformationMiddleware>(),
            )
        }))
    }
}

/// Whole seconds to wait, rounded up, for a `Retry-After` header (RFC 9110: delay-seconds).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(requests: u32, seconds: u64) -> Quota {
        Quota {
            requests: NonZeroU32::new(requests).unwrap(),
            window: Duration::from_secs(seconds),
        }
    }

    #[test]
    fn a_key_bursts_up_to_its_quota_then_is_limited() {
        let limiter = KeyRateLimiter::default();
        let key = KeyId::of("some key");
        for n in 1..=5 {
            assert_eq!(
                limiter.check(&key, quota(5, 60)),
                Decision::Allowed {
                    limit: 5,
                    remaining: 5 - n
                }
            );
        }
        match limiter.check(&key, quota(5, 60)) {
            Decision::Limited { limit, retry_after } => {
                assert_eq!(limit, 5);
                assert!(retry_after <= Duration::from_secs(12));
                assert!(retry_after > Duration::from_secs(11));
            }
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn keys_do_not_share_their_budget() {
        let limiter = KeyRateLimiter::default();
        let (a, b) = (KeyId::of("a"), KeyId::of("b"));
        assert!(matches!(
            limiter.check(&a, quota(1, 60)),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.check(&a, quota(1, 60)),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            limiter.check(&b, quota(1, 60)),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(600)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
