//! Governor's GCRA, written out over whole microseconds so that the in-process store and the
//! Redis script (`redis.rs`) run the same arithmetic and answer the same headers.
//!
//! A quota of `requests` per `window` has an emission interval `t = window / requests` and a
//! tolerance `tau = t * (requests - 1)`: a fresh key may send `requests` at once, then one more
//! every `t`. The only state is the key's theoretical arrival time (TAT). A request at `now`
//! is refused when `tat - now > tau`; otherwise the TAT becomes `max(tat, now) + t`.
//! The tests beside this file check every decision against governor itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Quota;

/// A quota in the units the arithmetic uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval, µs (at least 1).
    pub t: u64,
    /// Burst tolerance, µs.
    pub tau: u64,
}

/// What one request's check found, before it is dressed as headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; `remaining` more may follow at once; one more is regained in `more_in`.
    Allowed { remaining: u32, more_in: Duration },
    /// Refused; the next request may pass after `retry_in`.
    Limited { retry_in: Duration },
}

impl Gcra {
    pub fn new(quota: Quota) -> Self {
        let requests = u64::from(quota.requests.get());
        let window = u64::try_from(quota.window.as_micros()).unwrap_or(u64::MAX);
        let t = (window / requests).max(1);
        Self {
            t,
            tau: t.saturating_mul(requests - 1),
        }
    }

    /// Decides a request at `now` against the stored `tat` (none: a fresh key). Returns the
    /// verdict's raw form, `(allowed, tat - now)` with the TAT after the decision, and the TAT
    /// to store when allowed. The Redis script returns exactly this pair.
    pub fn decide(&self, now: u64, tat: Option<u64>) -> (bool, u64, Option<u64>) {
        let tat = tat.unwrap_or(now);
        let ahead = tat.saturating_sub(now);
        if ahead > self.tau {
            return (false, ahead, None);
        }
        let next = tat.max(now) + self.t;
        (true, next - now, Some(next))
    }

    /// The verdict from `(allowed, tat - now)`, the same for both stores.
    pub fn verdict(&self, allowed: bool, ahead: u64) -> Verdict {
        if !allowed {
            return Verdict::Limited {
                retry_in: Duration::from_micros(ahead.saturating_sub(self.tau)),
            };
        }
        // Credit left: how far the TAT is below its ceiling `now + tau + t`.
        let credit = (self.tau + self.t).saturating_sub(ahead);
        Verdict::Allowed {
            remaining: u32::try_from(credit / self.t).unwrap_or(u32::MAX),
            more_in: Duration::from_micros(self.t - credit % self.t),
        }
    }
}

/// Entries kept before stale ones are swept (a stale TAT is one already in the past).
const SWEEP_AT: usize = 10_000;

/// The in-process store: one TAT per (bucket, subject), on this process's monotonic clock.
pub struct LocalStore {
    epoch: Instant,
    tats: Mutex<HashMap<(&'static str, String), u64>>,
}

impl Default for LocalStore {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalStore {
    #[cfg(test)]
    pub fn check(&self, bucket: &'static str, subject: &str, quota: Quota) -> Verdict {
        self.decide(bucket, subject, quota, true)
    }

    /// `consume: false` asks whether a request would pass, without counting it.
    pub fn decide(
        &self,
        bucket: &'static str,
        subject: &str,
        quota: Quota,
        consume: bool,
    ) -> Verdict {
        let gcra = Gcra::new(quota);
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        let key = (bucket, subject.to_owned());
        let (allowed, ahead, store) = gcra.decide(now, tats.get(&key).copied());
        if let Some(next) = store.filter(|_| consume) {
            if tats.len() >= SWEEP_AT && !tats.contains_key(&key) {
                tats.retain(|_, tat| *tat > now);
            }
            tats.insert(key, next);
        }
        drop(tats);
        gcra.verdict(allowed, ahead)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;
    use governor::middleware::StateInformationMiddleware;
    use governor::{Quota as GovernorQuota, RateLimiter};

    use super::*;

    fn quota(requests: u32, seconds: u64) -> Quota {
        Quota {
            requests: NonZeroU32::new(requests).unwrap(),
            window: Duration::from_secs(seconds),
        }
    }

    /// The same sequence of requests, at the same instants, through governor and through
    /// `Gcra`: every decision, remaining count and wait must agree.
    fn agree_with_governor(q: Quota, steps_ms: &[u64]) {
        let clock = FakeRelativeClock::default();
        let governor_quota = GovernorQuota::with_period(q.window / q.requests.get())
            .unwrap()
            .allow_burst(q.requests);
        let governor = RateLimiter::direct_with_clock(governor_quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        let gcra = Gcra::new(q);
        let mut tat = None;
        let mut now_us = 0u64;
        for (i, step) in steps_ms.iter().enumerate() {
            clock.advance(Duration::from_millis(*step));
            now_us += step * 1000;
            let (allowed, ahead, next) = gcra.decide(now_us, tat);
            if next.is_some() {
                tat = next;
            }
            let ours = gcra.verdict(allowed, ahead);
            match (governor.check(), ours) {
                (Ok(state), Verdict::Allowed { remaining, .. }) => {
                    assert_eq!(state.remaining_burst_capacity(), remaining, "step {i}")
                }
                (Err(not_until), Verdict::Limited { retry_in }) => {
                    use governor::clock::Clock;
                    assert_eq!(not_until.wait_time_from(clock.now()), retry_in, "step {i}")
                }
                (theirs, ours) => panic!("step {i}: governor {theirs:?}, ours {ours:?}"),
            }
        }
    }

    #[test]
    fn it_decides_exactly_as_governor_on_a_burst_then_a_trickle() {
        let mut steps = vec![0; 120];
        steps.extend([100, 500, 599, 1, 600, 0, 0, 1200, 0, 0, 0, 60_000, 0, 0]);
        agree_with_governor(quota(100, 60), &steps);
    }

    #[test]
    fn it_decides_exactly_as_governor_on_irregular_traffic() {
        // A fixed pseudo-random walk: reproducible, and far from round numbers.
        let mut x: u64 = 0x9e37_79b9;
        let steps: Vec<u64> = (0..3000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % 1500
            })
            .collect();
        agree_with_governor(quota(5, 3), &steps);
        agree_with_governor(quota(100, 60), &steps);
        agree_with_governor(quota(1, 1), &steps);
    }

    #[test]
    fn a_fresh_key_bursts_its_quota_then_waits_one_interval() {
        let store = LocalStore::default();
        for n in (0..5).rev() {
            match store.check("default", "k", quota(5, 60)) {
                Verdict::Allowed { remaining, more_in } => {
                    assert_eq!(remaining, n);
                    assert!(more_in <= Duration::from_secs(12), "{more_in:?}");
                }
                other => panic!("expected allowed, got {other:?}"),
            }
        }
        match store.check("default", "k", quota(5, 60)) {
            Verdict::Limited { retry_in } => {
                assert!(retry_in > Duration::from_secs(11) && retry_in <= Duration::from_secs(12))
            }
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn buckets_and_subjects_do_not_share_a_budget() {
        let store = LocalStore::default();
        let one = quota(1, 60);
        assert!(matches!(
            store.check("default", "a", one),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            store.check("default", "a", one),
            Verdict::Limited { .. }
        ));
        assert!(matches!(
            store.check("default", "b", one),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            store.check("sync", "a", one),
            Verdict::Allowed { .. }
        ));
    }
}
