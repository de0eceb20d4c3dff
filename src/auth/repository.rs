//! The `api_keys` and `tenants` tables: what the authenticator reads and operators change.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{FromRow, PgPool, Postgres, Transaction};

use super::hash::hash_key;
use super::key::{KeyId, generate};
use crate::ratelimit::Quota;

/// The tenant that `MAESTRA_API_KEY` belongs to.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, FromRow)]
pub struct KeyRow {
    pub id: String,
    pub tenant_id: String,
    pub label: Option<String>,
    pub secret_hash: String,
    pub rate_limit_requests: Option<i32>,
    pub rate_limit_window_seconds: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub replaced_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl KeyRow {
    /// Valid at `now`: not revoked (or still in its rotation grace) and not expired.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none_or(|t| t > now) && self.expires_at.is_none_or(|t| t > now)
    }

    /// Its own quota, if its row sets one.
    pub fn quota_override(&self) -> Option<Quota> {
        let requests = NonZeroU32::new(u32::try_from(self.rate_limit_requests?).ok()?)?;
        let seconds = u64::try_from(self.rate_limit_window_seconds?).ok()?;
        Some(Quota {
            requests,
            window: Duration::from_secs(seconds),
        })
    }

    pub fn state_at(&self, now: DateTime<Utc>) -> String {
        match (self.revoked_at, self.expires_at) {
            (Some(t), _) if t <= now => "revoked".to_owned(),
            (_, Some(t)) if t <= now => "expired".to_owned(),
            (Some(t), _) => format!(
                "rotating (valid until {})",
                t.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            _ => "active".to_owned(),
        }
    }
}

const KEY_COLUMNS: &str = "id, tenant_id, label, secret_hash, rate_limit_requests, \
    rate_limit_window_seconds, created_at, expires_at, revoked_at, replaced_by, last_used_at";

pub async fn fetch<'c>(
    pool: impl sqlx::Executor<'c, Database = Postgres>,
    id: &KeyId,
) -> Result<Option<KeyRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
}

/// What a new key is for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub tenant: String,
    pub label: Option<String>,
    pub quota: Option<Quota>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Creates a key (and its tenant if new). The returned key is shown once and stored nowhere.
pub async fn create(pool: &PgPool, new: &NewKey) -> anyhow::Result<(KeyId, SecretString)> {
    let mut tx = pool.begin().await?;
    let created = insert(&mut tx, new).await?;
    tx.commit().await?;
    Ok(created)
}

async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewKey,
) -> anyhow::Result<(KeyId, SecretString)> {
    let (id, key) = generate()?;
    let hash = hash_on_blocking_pool(key.clone()).await?;
    ensure_tenant(tx, &new.tenant).await?;
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, label, secret_hash, rate_limit_requests,
             rate_limit_window_seconds, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.as_str())
    .bind(&new.tenant)
    .bind(&new.label)
    .bind(&hash)
    .bind(new.quota.map(|q| q.requests.get() as i32))
    .bind(new.quota.map(|q| q.window.as_secs() as i32))
    .bind(new.expires_at)
    .execute(&mut **tx)
    .await?;
    Ok((id, key))
}

async fn ensure_tenant(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(tenant)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn hash_on_blocking_pool(key: SecretString) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash_key(key.expose_secret()))
        .await
        .context("the hashing task failed")?
}

pub async fn list(pool: &PgPool, tenant: Option<&str>) -> Result<Vec<KeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE $1::text IS NULL OR tenant_id = $1
         ORDER BY tenant_id, created_at"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await
}

/// Revokes now. Revoking a revoked key changes nothing (the first revocation time stays).
pub async fn revoke(pool: &PgPool, id: &KeyId) -> anyhow::Result<KeyRow> {
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "UPDATE api_keys SET revoked_at = LEAST(COALESCE(revoked_at, now()), now())
         WHERE id = $1 RETURNING {KEY_COLUMNS}"
    ))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.with_context(|| format!("no key with id {id}"))
}

/// Issues a replacement with the same tenant, label, quota and expiry; the old key keeps
/// working for `grace`. One transaction: a failed rotation changes nothing, so it can simply
/// be run again.
pub async fn rotate(
    pool: &PgPool,
    id: &KeyId,
    grace: Duration,
) -> anyhow::Result<(KeyId, SecretString, DateTime<Utc>)> {
    let mut tx = pool.begin().await?;
    let old: Option<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let old = old.with_context(|| format!("no key with id {id}"))?;
    let now = Utc::now();
    if !old.is_valid_at(now) {
        bail!(
            "key {id} is {}; create a new key instead",
            old.state_at(now)
        );
    }
    let new = NewKey {
        tenant: old.tenant_id.clone(),
        label: old.label.clone(),
        quota: old.quota_override(),
        expires_at: old.expires_at,
    };
    let (new_id, key) = insert(&mut tx, &new).await?;
    let grace = chrono::Duration::from_std(grace).context("--grace is too long")?;
    // A second rotation never extends the first one's grace.
    let valid_until: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = LEAST(COALESCE(revoked_at, $2), $2), replaced_by = $3
         WHERE id = $1 RETURNING revoked_at",
    )
    .bind(id.as_str())
    .bind(now + grace)
    .bind(new_id.as_str())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((new_id, key, valid_until))
}

/// Makes `key` (from `MAESTRA_API_KEY`) a valid key of the default tenant, and the only
/// bootstrap key: a previous `MAESTRA_API_KEY` stops working when it is replaced.
pub async fn ensure_bootstrap(pool: &PgPool, key: &SecretString) -> anyhow::Result<KeyId> {
    let id = KeyId::of(key.expose_secret());
    let mut tx = pool.begin().await?;
    ensure_tenant(&mut tx, DEFAULT_TENANT).await?;
    let existing: Option<(bool,)> =
        sqlx::query_as("SELECT revoked_at IS NULL FROM api_keys WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    match existing {
        Some((true,)) => {}
        Some((false,)) => {
            tracing::warn!(key.id = %id, "MAESTRA_API_KEY was revoked by an operator; it stays revoked");
        }
        None => {
            let hash = hash_on_blocking_pool(key.clone()).await?;
            sqlx::query(
                "INSERT INTO api_keys (id, tenant_id, label, secret_hash, bootstrap)
                 VALUES ($1, $2, 'MAESTRA_API_KEY', $3, true)",
            )
            .bind(id.as_str())
            .bind(DEFAULT_TENANT)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now()
         WHERE bootstrap AND id <> $1 AND (revoked_at IS NULL OR revoked_at > now())",
    )
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Records when keys were last used, in one statement for many keys.
pub async fn record_last_used<'c>(
    pool: impl sqlx::Executor<'c, Database = Postgres>,
    used: &[(KeyId, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    if used.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = used.iter().map(|(id, _)| id.as_str()).collect();
    let times: Vec<DateTime<Utc>> = used.iter().map(|(_, t)| *t).collect();
    sqlx::query(
        "UPDATE api_keys SET last_used_at = GREATEST(COALESCE(last_used_at, v.ts), v.ts)
         FROM UNNEST($1::text[], $2::timestamptz[]) AS v(id, ts)
         WHERE api_keys.id = v.id",
    )
    .bind(&ids)
    .bind(&times)
    .execute(pool)
    .await?;
    Ok(())
}
