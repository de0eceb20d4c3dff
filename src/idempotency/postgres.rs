//! Cloud mode's idempotency records, in `idempotency_keys`; each step is one statement, and
//! claiming a key locks its row so two replicas cannot both run the same request.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::types::Json;

use super::{Begin, IdempotencyKey, IdempotencyStore, LEASE, RETENTION};
use crate::db::Db;
use crate::domain::ConversationId;
use crate::domain::TurnOutcome;
use crate::store::StoreError;

#[derive(Clone)]
pub struct PgIdempotency {
    pool: Db,
}

impl PgIdempotency {
    pub fn new(pool: impl Into<Db>) -> Self {
        Self { pool: pool.into() }
    }
}

impl PgIdempotency {
    /// Forgets keys past their 24 h, now and then.
    pub async fn prune_periodically(self) {
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            ticker.tick().await;
            let pruned = sqlx::query(
                "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)",
            )
            .bind(seconds(RETENTION))
            .execute(&self.pool)
            .await;
            if let Err(e) = pruned {
                tracing::warn!(error = %e, "cannot prune old idempotency keys");
            }
        }
    }
}

fn seconds(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64()
}

#[async_trait]
impl IdempotencyStore for PgIdempotency {
    async fn begin(&self, tenant: &str, key: &IdempotencyKey) -> Result<Begin, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A new key, or one past its 24 h, is (re)claimed as fresh.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys AS k (tenant_id, key, fingerprint, locked_until)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))
             ON CONFLICT (tenant_id, key) DO UPDATE
                 SET fingerprint = EXCLUDED.fingerprint, created_at = now(),
                     locked_until = EXCLUDED.locked_until, conversation_id = NULL,
                     user_seq = NULL, outcome = NULL
                 WHERE k.created_at <= now() - make_interval(secs => $5)
             RETURNING 1",
        )
        .bind(tenant)
        .bind(key.key())
        .bind(key.fingerprint())
        .bind(seconds(LEASE))
        .bind(seconds(RETENTION))
        .fetch_optional(&mut *tx)
        .await?;
        if claimed.is_some() {
            tx.commit().await?;
            return Ok(Begin::Fresh);
        }
        let row = sqlx::query(
            "SELECT fingerprint, locked_until > now() AS locked, conversation_id, user_seq, outcome
             FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 FOR UPDATE",
        )
        .bind(tenant)
        .bind(key.key())
        .fetch_one(&mut *tx)
        .await?;
        let fingerprint: String = row.try_get("fingerprint")?;
        let locked: Option<bool> = row.try_get("locked")?;
        let conversation_id: Option<String> = row.try_get("conversation_id")?;
        let user_seq: Option<i64> = row.try_get("user_seq")?;
        let outcome: Option<Json<TurnOutcome>> = row.try_get("outcome")?;
        let begin = if fingerprint != key.fingerprint() {
            Begin::Conflict
        } else if let Some(Json(outcome)) = outcome {
            Begin::Replay(Box::new(outcome))
        } else if locked == Some(true) {
            Begin::InProgress
        } else {
            sqlx::query(
                "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3)
                 WHERE tenant_id = $1 AND key = $2",
            )
            .bind(tenant)
            .bind(key.key())
            .bind(seconds(LEASE))
            .execute(&mut *tx)
            .await?;
            match (
                conversation_id.as_deref().map(ConversationId::parse),
                user_seq,
            ) {
                (Some(Ok(conversation_id)), Some(user_seq)) => Begin::Resume {
                    conversation_id,
                    user_seq,
                },
                _ => Begin::Fresh,
            }
        };
        tx.commit().await?;
        Ok(begin)
    }

    async fn user_stored(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET conversation_id = $3, user_seq = $4
             WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key.key())
        .bind(conversation.as_str())
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn complete(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        outcome: &TurnOutcome,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET outcome = $3, locked_until = NULL
             WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key.key())
        .bind(Json(outcome))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, tenant: &str, key: &IdempotencyKey) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET locked_until = NULL WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key.key())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
