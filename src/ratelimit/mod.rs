//! Request quotas (cloud mode), on governor's GCRA: a subject (an API key, or a client address
//! for keys not verified yet) may burst up to `requests` at once and regains one request every
//! `window / requests`. So 100 per 60 s means 100 immediately, then one more every 0.6 s.
//!
//! Two stores, one behaviour (`gcra.rs` holds the arithmetic both run):
//! - `memory`: in this process. Right for one replica.
//! - `redis`: one shared budget for every replica (`shared.rs`). When Redis is slow or down, a
//!   breaker opens and each replica limits locally at `ceil(quota / replicas)` until Redis
//!   answers again: never a 5xx, never "no limit at all".
//!
//! Quotas live in named buckets per subject. A new bucket (say `"sync"`, with its own quota)
//! is a new `Policy`; the subject's other buckets are untouched.

mod gcra;
mod shared;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub use gcra::{Gcra, Verdict};
pub use shared::RedisSettings;

use crate::metrics::Metrics;
use gcra::LocalStore;
use shared::{Failure, RedisStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub requests: NonZeroU32,
    pub window: Duration,
}

impl Quota {
    /// One replica's share when it must decide alone: `ceil(requests / replicas)` per window.
    pub fn share(self, replicas: NonZeroU32) -> Quota {
        let requests = self.requests.get().div_ceil(replicas.get());
        Quota {
            requests: NonZeroU32::new(requests).unwrap_or(NonZeroU32::MIN),
            window: self.window,
        }
    }
}

/// The bucket every API route draws on.
pub const DEFAULT_BUCKET: &str = "default";
/// Failed authentications, per client address.
pub const UNVERIFIED_BUCKET: &str = "unverified";

/// A named quota: the bucket is the name clients see in `RateLimit-Policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub bucket: &'static str,
    pub quota: Quota,
}

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(String);

impl Subject {
    pub fn key(id: &crate::auth::KeyId) -> Self {
        Self(format!("key:{}", id.as_str()))
    }

    pub fn address(ip: std::net::IpAddr) -> Self {
        Self(format!("addr:{ip}"))
    }
}

/// A decision and the policy it was taken under (a replica's share while degraded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub policy: Policy,
    pub verdict: Verdict,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allowed { .. })
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Memory,
    Redis(RedisSettings),
}

/// Consecutive failed Redis calls that open the breaker.
const OPEN_AFTER_FAILURES: u32 = 3;
/// While open, how often Redis is asked whether it is back.
const PROBE_EVERY: Duration = Duration::from_millis(250);

pub struct RateLimiter {
    /// The `memory` backend's store, or the `redis` backend's fallback while degraded.
    local: LocalStore,
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
}

struct Shared {
    store: RedisStore,
    replicas: NonZeroU32,
    open: AtomicBool,
    state: Mutex<BreakerState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct BreakerState {
    consecutive_failures: u32,
    opened_at: Option<Instant>,
}

impl RateLimiter {
    pub fn new(backend: Backend, replicas: NonZeroU32, metrics: Arc<Metrics>) -> Self {
        let shared = match backend {
            Backend::Memory => None,
            Backend::Redis(settings) => Some(Arc::new(Shared {
                store: RedisStore::new(settings),
                replicas,
                open: AtomicBool::new(false),
                state: Mutex::new(BreakerState::default()),
                metrics: Arc::clone(&metrics),
            })),
        };
        Self {
            local: LocalStore::default(),
            shared,
            metrics,
        }
    }

    /// The URL's problems, found without connecting.
    pub fn validate(settings: &RedisSettings) -> Result<(), String> {
        RedisStore::validate(settings)
    }

    /// Connects to Redis, if that is the backend. A Redis that does not answer does not stop
    /// start-up: the limiter starts degraded, and recovers when Redis answers.
    pub async fn start(&self) {
        if let Some(shared) = &self.shared {
            match shared.store.ping().await {
                Ok(()) => tracing::info!(backend = "redis", "rate limiter connected to Redis"),
                Err(failure) => shared.open(failure),
            }
        }
    }

    pub fn backend(&self) -> &'static str {
        if self.shared.is_some() {
            "redis"
        } else {
            "memory"
        }
    }

    /// Whether decisions are local because Redis is not answering.
    pub fn is_degraded(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.open.load(Ordering::Relaxed))
    }

    /// Counts one request against `subject`'s bucket.
    pub async fn check(&self, policy: Policy, subject: &Subject) -> Decision {
        self.decide(policy, subject, true).await
    }

    /// Whether a request would pass, without counting it (a bucket that only failures spend).
    pub async fn peek(&self, policy: Policy, subject: &Subject) -> Decision {
        self.decide(policy, subject, false).await
    }

    async fn decide(&self, policy: Policy, subject: &Subject, consume: bool) -> Decision {
        let Some(shared) = &self.shared else {
            let verdict = self
                .local
                .decide(policy.bucket, &subject.0, policy.quota, consume);
            return self.decided("memory", policy, verdict);
        };
        if shared.open.load(Ordering::Relaxed) {
            self.metrics
                .ratelimit_fallbacks
                .with_label_values(&["breaker_open"])
                .inc();
        } else {
            let gcra = Gcra::new(policy.quota);
            let started = Instant::now();
            let answer = shared
                .store
                .check(policy.bucket, &subject.0, gcra, consume)
                .await;
            self.metrics
                .ratelimit_backend_duration
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Ok((allowed, ahead)) => {
                    shared.succeeded();
                    return self.decided("redis", policy, gcra.verdict(allowed, ahead));
                }
                Err(failure) => {
                    self.metrics
                        .ratelimit_fallbacks
                        .with_label_values(&[failure.as_str()])
                        .inc();
                    shared.failed(failure);
                }
            }
        }
        let share = Policy {
            bucket: policy.bucket,
            quota: policy.quota.share(shared.replicas),
        };
        let verdict = self
            .local
            .decide(share.bucket, &subject.0, share.quota, consume);
        self.decided("local_fallback", share, verdict)
    }

    fn decided(&self, backend: &str, policy: Policy, verdict: Verdict) -> Decision {
        let outcome = match verdict {
            Verdict::Allowed { .. } => "allowed",
            Verdict::Limited { .. } => "limited",
        };
        self.metrics
            .ratelimit_decisions
            .with_label_values(&[backend, outcome])
            .inc();
        Decision { policy, verdict }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn succeeded(&self) {
        self.lock().consecutive_failures = 0;
    }

    fn failed(self: &Arc<Self>, failure: Failure) {
        let mut state = self.lock();
        state.consecutive_failures += 1;
        if state.consecutive_failures >= OPEN_AFTER_FAILURES {
            drop(state);
            self.open(failure);
        }
    }

    /// Opens the breaker (once: a second caller finds it open) and starts the probe.
    fn open(self: &Arc<Self>, failure: Failure) {
        if self.open.swap(true, Ordering::AcqRel) {
            return;
        }
        self.lock().opened_at = Some(Instant::now());
        self.metrics.ratelimit_degraded.set(1);
        let detail = self.store.take_connect_error().unwrap_or_default();
        tracing::warn!(
            backend = "redis",
            reason = failure.as_str(),
            detail = %detail,
            fallback = "local",
            replicas = self.replicas.get(),
            "rate limiter degraded: Redis is not answering; each replica now limits every key locally at ceil(quota / replicas) until it does"
        );
        tokio::spawn(probe(Arc::downgrade(self)));
    }

    fn close(&self) {
        let opened_at = {
            let mut state = self.lock();
            state.consecutive_failures = 0;
            state.opened_at.take()
        };
        self.open.store(false, Ordering::Release);
        self.metrics.ratelimit_degraded.set(0);
        tracing::info!(
            backend = "redis",
            degraded_ms = opened_at.map_or(0, |t| t.elapsed().as_millis()),
            "rate limiter recovered: Redis answers again; quotas are shared across replicas"
        );
    }
}

/// Asks Redis every `PROBE_EVERY` whether it is back; closes the breaker when it is. Ends
/// when the limiter is gone.
async fn probe(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.store.ping().await.is_ok() {
            shared.close();
            return;
        }
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
    fn a_replicas_share_is_the_quota_divided_and_rounded_up() {
        let three = NonZeroU32::new(3).unwrap();
        assert_eq!(quota(100, 60).share(three), quota(34, 60));
        assert_eq!(quota(1, 60).share(three), quota(1, 60));
        assert_eq!(quota(99, 60).share(three), quota(33, 60));
        assert_eq!(quota(100, 60).share(NonZeroU32::MIN), quota(100, 60));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(600)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }

    #[tokio::test]
    async fn the_memory_backend_limits_per_subject() {
        let metrics = Arc::new(Metrics::new("cloud").unwrap());
        let limiter = RateLimiter::new(Backend::Memory, NonZeroU32::MIN, metrics);
        let policy = Policy {
            bucket: DEFAULT_BUCKET,
            quota: quota(2, 60),
        };
        let a = Subject("key:a".to_owned());
        assert!(limiter.check(policy, &a).await.is_allowed());
        assert!(limiter.check(policy, &a).await.is_allowed());
        assert!(!limiter.check(policy, &a).await.is_allowed());
        assert!(
            limiter
                .check(policy, &Subject("key:b".to_owned()))
                .await
                .is_allowed()
        );
        assert!(!limiter.is_degraded());
    }
}
