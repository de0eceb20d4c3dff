//! Who is calling: a presented key → its tenant and quota.
//!
//! argon2 runs once per key; the verdict is then cached (bounded), keyed by the key id and
//! recognised by the key's SHA-256. A cached verdict is re-read from the database when Postgres
//! announces a change to that key (LISTEN/NOTIFY, fed by a trigger, so an operator's UPDATE in
//! psql counts too) or after `ttl` as a backstop; re-reading costs a primary-key lookup, not
//! another argon2, unless the key's hash itself changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::IntCounter;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::hash::verify_key;
use super::key::{KeyId, digest};
use super::repository::{self, KeyRow};
use crate::db::Db;
use crate::ratelimit::Quota;

/// Postgres channel the `api_keys` trigger notifies.
pub const CHANNEL: &str = "maestra_api_keys";
/// Verified keys remembered at once.
const MAX_CACHED: usize = 10_000;
/// How often `last_used_at` is written back.
const LAST_USED_FLUSH: Duration = Duration::from_secs(30);

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: KeyId,
    pub tenant_id: String,
    pub quota: Quota,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, unknown, wrong, revoked or expired: one answer for all.
    #[error("unauthorized")]
    Unauthorized,
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Other(anyhow::Error),
}

struct Verified {
    digest: [u8; 32],
    /// The hash it was verified against: unchanged on re-read means no new argon2.
    secret_hash: String,
    principal: Principal,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    checked_at: Instant,
    stale: bool,
}

impl Verified {
    fn is_current(&self, ttl: Duration) -> bool {
        !self.stale && self.checked_at.elapsed() < ttl
    }

    fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none_or(|t| t > now) && self.expires_at.is_none_or(|t| t > now)
    }
}

pub struct Authenticator {
    pool: Db,
    /// A direct connection's pool for the change feed: LISTEN needs a session of its own, which
    /// a transaction pooler does not keep.
    listen: PgPool,
    default_quota: Quota,
    ttl: Duration,
    cache: Mutex<HashMap<KeyId, Verified>>,
    last_used: Mutex<HashMap<KeyId, DateTime<Utc>>>,
    /// argon2 runs, exported as a metric: it should stay near the number of keys in use.
    argon2_verifications: IntCounter,
    argon2_slots: tokio::sync::Semaphore,
    /// Keys being looked up now, one look-up each, with the key fingerprints that look-up
    /// already refused (so requests waiting behind it get the same answer without argon2).
    in_flight: Mutex<HashMap<KeyId, Flight>>,
}

#[derive(Default)]
struct Flight {
    turn: Arc<tokio::sync::Mutex<()>>,
    refused: Vec<[u8; 32]>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compares digests without an early exit.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn new(
        pool: PgPool,
        default_quota: Quota,
        ttl: Duration,
        argon2_verifications: IntCounter,
    ) -> Self {
        Self {
            listen: pool.clone(),
            pool: Db::from(pool),
            default_quota,
            ttl,
            cache: Mutex::new(HashMap::new()),
            last_used: Mutex::new(HashMap::new()),
            argon2_verifications,
            // One at a time: each run holds 19 MiB that the allocator keeps afterwards, and new
            // keys are rare (verified keys are cached).
            argon2_slots: tokio::sync::Semaphore::new(1),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Queries through `pool` (e.g. a transaction pooler) and follows key changes on `listen`,
    /// a direct connection.
    pub fn with_pools(mut self, pool: Db, listen: PgPool) -> Self {
        self.pool = pool;
        self.listen = listen;
        self
    }

    /// Whether this key was verified before (its re-check, if due, needs no argon2), or is
    /// being looked up now (the request will wait for that verdict): such requests skip the
    /// per-address limit on unverified attempts.
    pub fn is_recognised(&self, presented: &str) -> bool {
        let id = KeyId::of(presented);
        if lock(&self.in_flight).contains_key(&id) {
            return true;
        }
        let digest = digest(presented);
        let cache = lock(&self.cache);
        cache
            .get(&id)
            .is_some_and(|v| same_digest(&v.digest, &digest) && v.is_valid_at(Utc::now()))
    }

    #[tracing::instrument(name = "auth.authenticate", skip_all)]
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, AuthError> {
        let id = KeyId::of(presented);
        let digest = digest(presented);
        if let Some(verdict) = self.cached_verdict(&id, &digest) {
            return verdict;
        }
        // One look-up per key at a time: a burst of first requests with a new key waits for
        // the first one's verdict instead of each running argon2.
        let turn = self.in_flight(&id);
        let guard = turn.lock().await;
        let outcome = match self.refused_in_flight(&id, &digest) {
            true => Err(AuthError::Unauthorized),
            false => self.verify_and_remember(&id, digest, presented).await,
        };
        if matches!(outcome, Err(AuthError::Unauthorized)) {
            self.refuse_in_flight(&id, digest);
        }
        drop(guard);
        self.land(&id, turn);
        outcome
    }

    /// The cached verdict, if current.
    fn cached_verdict(
        &self,
        id: &KeyId,
        digest: &[u8; 32],
    ) -> Option<Result<Principal, AuthError>> {
        let now = Utc::now();
        let cache = lock(&self.cache);
        let verified = cache.get(id)?;
        if !(same_digest(&verified.digest, digest) && verified.is_current(self.ttl)) {
            return None;
        }
        if !verified.is_valid_at(now) {
            return Some(Err(AuthError::Unauthorized));
        }
        let principal = verified.principal.clone();
        drop(cache);
        lock(&self.last_used).insert(id.clone(), now);
        Some(Ok(principal))
    }

    fn in_flight(&self, id: &KeyId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(&lock(&self.in_flight).entry(id.clone()).or_default().turn)
    }

    fn refused_in_flight(&self, id: &KeyId, digest: &[u8; 32]) -> bool {
        lock(&self.in_flight)
            .get(id)
            .is_some_and(|f| f.refused.iter().any(|d| same_digest(d, digest)))
    }

    fn refuse_in_flight(&self, id: &KeyId, digest: [u8; 32]) {
        if let Some(flight) = lock(&self.in_flight).get_mut(id) {
            flight.refused.push(digest);
        }
    }

    /// Forgets a key's look-up once nobody waits on it.
    fn land(&self, id: &KeyId, turn: Arc<tokio::sync::Mutex<()>>) {
        let mut in_flight = lock(&self.in_flight);
        drop(turn);
        if in_flight
            .get(id)
            .is_some_and(|f| Arc::strong_count(&f.turn) == 1)
        {
            in_flight.remove(id);
        }
    }

    async fn verify_and_remember(
        &self,
        id: &KeyId,
        digest: [u8; 32],
        presented: &str,
    ) -> Result<Principal, AuthError> {
        // Another request may have settled it while this one waited.
        if let Some(verdict) = self.cached_verdict(id, &digest) {
            return verdict;
        }
        let now = Utc::now();
        let known_hash = {
            let cache = lock(&self.cache);
            match cache.get(id) {
                Some(v) if same_digest(&v.digest, &digest) => Some(v.secret_hash.clone()),
                _ => None,
            }
        };

        let row = repository::fetch(&self.pool, id).await.map_err(|e| {
            if crate::store::is_unavailable(&e) {
                AuthError::Unavailable(e.to_string())
            } else {
                AuthError::Other(e.into())
            }
        })?;
        let already_verified =
            matches!((&row, &known_hash), (Some(r), Some(h)) if &r.secret_hash == h);
        if !already_verified
            && !self
                .verify(presented, row.as_ref().map(|r| r.secret_hash.clone()))
                .await?
        {
            return Err(AuthError::Unauthorized);
        }
        let Some(row) = row else {
            return Err(AuthError::Unauthorized);
        };
        let principal = self.remember(id, digest, &row);
        if !row.is_valid_at(now) {
            return Err(AuthError::Unauthorized);
        }
        lock(&self.last_used).insert(id.clone(), now);
        Ok(principal)
    }

    async fn verify(
        &self,
        presented: &str,
        secret_hash: Option<String>,
    ) -> Result<bool, AuthError> {
        // Each argon2 run holds 19 MiB: bound how many run at once, whoever asks.
        let _permit = self
            .argon2_slots
            .acquire()
            .await
            .map_err(|e| AuthError::Other(anyhow::anyhow!("argon2 slots closed: {e}")))?;
        self.argon2_verifications.inc();
        let presented = presented.to_owned();
        tokio::task::spawn_blocking(move || verify_key(&presented, secret_hash.as_deref()))
            .await
            .map_err(|e| AuthError::Other(anyhow::anyhow!("argon2 task failed: {e}")))
    }

    fn remember(&self, id: &KeyId, digest: [u8; 32], row: &KeyRow) -> Principal {
        let principal = Principal {
            key_id: id.clone(),
            tenant_id: row.tenant_id.clone(),
            quota: row.quota_override().unwrap_or(self.default_quota),
        };
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED && !cache.contains_key(id) {
            cache.retain(|_, v| v.is_current(self.ttl));
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            id.clone(),
            Verified {
                digest,
                secret_hash: row.secret_hash.clone(),
                principal: principal.clone(),
                expires_at: row.expires_at,
                revoked_at: row.revoked_at,
                checked_at: Instant::now(),
                stale: false,
            },
        );
        principal
    }

    fn mark_stale(&self, id: Option<&KeyId>) {
        let mut cache = lock(&self.cache);
        match id {
            Some(id) => {
                if let Some(v) = cache.get_mut(id) {
                    v.stale = true;
                }
            }
            None => cache.values_mut().for_each(|v| v.stale = true),
        }
    }

    /// Follows key changes announced by Postgres, for as long as the server runs. Whenever the
    /// connection drops, notifications may have been missed, so every cached key is re-read.
    pub async fn follow_key_changes(self: Arc<Self>) {
        loop {
            let mut listener = match PgListener::connect_with(&self.listen).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for API key changes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "cannot listen for API key changes; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Changes made while nobody listened are unknown.
            self.mark_stale(None);
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        self.mark_stale(KeyId::parse(notification.payload()).as_ref());
                    }
                    Ok(None) => {
                        self.mark_stale(None);
                        tracing::warn!("lost the API key change feed; reconnecting");
                        break;
                    }
                    Err(e) => {
                        self.mark_stale(None);
                        tracing::warn!(error = %e, "lost the API key change feed; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Writes `last_used_at` back now and then, instead of once per request.
    pub async fn flush_last_used_periodically(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(LAST_USED_FLUSH);
        loop {
            ticker.tick().await;
            self.flush_last_used().await;
        }
    }

    pub async fn flush_last_used(&self) {
        let used: Vec<(KeyId, DateTime<Utc>)> = lock(&self.last_used).drain().collect();
        if let Err(e) = repository::record_last_used(&self.pool, &used).await {
            tracing::warn!(error = %e, keys = used.len(), "cannot record when keys were last used");
        }
    }
}
