//! Cloud mode's store: conversations and messages in Postgres.
//!
//! An append is one statement: it creates or bumps the conversation row (whose lock orders
//! concurrent writers), inserts the message with the new seq and, for a reply, its usage row,
//! all in one implicit transaction. Every query is scoped by tenant and user.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};

use super::{ConversationStore, ConversationSummary, Owner, StoreError};
use crate::db::Db;
use crate::domain::{ConversationId, Message, NewMessage, Role, SurfaceId, Usage, UserId};

#[derive(Clone)]
pub struct PgStore {
    pool: Db,
    /// The newest migration this build knows: the store is usable once it is applied.
    latest_migration: i64,
}

impl PgStore {
    pub fn new(pool: impl Into<Db>) -> Self {
        let pool = pool.into();
        let latest_migration = crate::db::MIGRATOR
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or_default();
        Self {
            pool,
            latest_migration,
        }
    }
}

const MESSAGE_COLUMNS: &str = "m.id, m.seq, m.role, m.surface_id, m.content, m.created_at, m.model, \
     m.prompt_tokens, m.completion_tokens, m.cost_usd";

impl<'r> FromRow<'r, PgRow> for Message {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let decode = |column: &str, e: crate::domain::InvalidInput| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: Box::new(e),
        };
        let role = match row.try_get::<&str, _>("role")? {
            "user" => Role::User,
            _ => Role::Assistant,
        };
        let prompt_tokens: Option<i64> = row.try_get("prompt_tokens")?;
        let completion_tokens: Option<i64> = row.try_get("completion_tokens")?;
        let cost_usd: Option<f64> = row.try_get("cost_usd")?;
        let usage = match (prompt_tokens, completion_tokens, cost_usd) {
            (Some(p), Some(c), Some(cost)) => Some(Usage {
                prompt_tokens: u64::try_from(p).unwrap_or_default(),
                completion_tokens: u64::try_from(c).unwrap_or_default(),
                cost_usd: cost,
            }),
            _ => None,
        };
        Ok(Message {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            role,
            surface_id: SurfaceId::parse(row.try_get("surface_id")?)
                .map_err(|e| decode("surface_id", e))?,
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
            model: row.try_get("model")?,
            usage,
        })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Other(e.into())
        }
    }
}

/// Whether the database is out of reach (as opposed to a query that is wrong).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // Connection exceptions (08), insufficient resources (53), operator intervention (57:
        // shutdown, restart, cannot connect now).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

#[async_trait]
impl ConversationStore for PgStore {
    async fn append(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
    ) -> Result<Message, StoreError> {
        let api_key_id = new.api_key_id.clone();
        let message = new.into_message(0); // the seq comes from the database
        let usage = message.usage.filter(|_| message.model.is_some());
        let row = sqlx::query(
            "WITH conversation AS (
                 INSERT INTO conversations AS c (tenant_id, id, user_id, last_seq)
                 VALUES ($1, $2, $3, 1)
                 ON CONFLICT (id) DO UPDATE
                     SET last_seq = c.last_seq + 1, updated_at = now()
                     WHERE c.tenant_id = EXCLUDED.tenant_id AND c.user_id = EXCLUDED.user_id
                 RETURNING last_seq
             ), message AS (
                 INSERT INTO messages (conversation_id, seq, id, role, surface_id,
                     content, created_at, model, prompt_tokens, completion_tokens, cost_usd,
                     api_key_id)
                 SELECT $2, last_seq, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
                 FROM conversation
                 RETURNING seq
             ), usage_row AS (
                 INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id,
                     surface_id, model, prompt_tokens, completion_tokens, cost_usd)
                 SELECT $8, $1, $13, $3, $2, $6, $9, $10, $11, $12
                 FROM conversation WHERE $14
             )
             SELECT seq FROM message",
        )
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .bind(&message.id)
        .bind(role_name(message.role))
        .bind(message.surface_id.as_str())
        .bind(&message.content)
        .bind(message.created_at)
        .bind(&message.model)
        .bind(usage.map(|u| u.prompt_tokens as i64))
        .bind(usage.map(|u| u.completion_tokens as i64))
        .bind(usage.map(|u| u.cost_usd))
        .bind(&api_key_id)
        .bind(usage.is_some())
        .fetch_optional(&self.pool)
        .await?;
        // No row: the conversation exists and belongs to someone else.
        let seq: i64 = row.ok_or(StoreError::NotFound)?.try_get("seq")?;
        Ok(Message { seq, ..message })
    }

    async fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut messages: Vec<Message> = sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             JOIN conversations c ON c.id = m.conversation_id
             WHERE c.tenant_id = $1 AND c.id = $2 AND c.user_id = $3
             ORDER BY m.seq DESC LIMIT $4"
        ))
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        // A conversation always holds its first message: none means none of the owner's.
        if messages.is_empty() {
            return Err(StoreError::NotFound);
        }
        messages.reverse();
        Ok(messages)
    }

    async fn messages(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query(
            "SELECT 1 FROM conversations WHERE tenant_id = $1 AND id = $2 AND user_id = $3",
        )
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let messages = sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             WHERE m.conversation_id = $1 AND m.seq > $2
             ORDER BY m.seq LIMIT $3"
        ))
        .bind(conversation.as_str())
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(messages)
    }

    async fn list(
        &self,
        owner: &Owner,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, user_id, created_at, updated_at FROM conversations
             WHERE tenant_id = $1 AND user_id = $2
             ORDER BY updated_at DESC, id DESC OFFSET $3 LIMIT $4",
        )
        .bind(&owner.tenant)
        .bind(owner.user_id.as_str())
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: &str = row.try_get("id")?;
                let user_id: &str = row.try_get("user_id")?;
                let created_at: DateTime<Utc> = row.try_get("created_at")?;
                let updated_at: DateTime<Utc> = row.try_get("updated_at")?;
                Ok(ConversationSummary {
                    conversation_id: ConversationId::parse(id).map_err(anyhow::Error::from)?,
                    user_id: UserId::parse(user_id).map_err(anyhow::Error::from)?,
                    created_at,
                    updated_at,
                })
            })
            .collect()
    }

    async fn delete(&self, owner: &Owner, conversation: &ConversationId) -> Result<(), StoreError> {
        // Its messages go with it (ON DELETE CASCADE), in this one statement.
        let deleted = sqlx::query(
            "DELETE FROM conversations WHERE tenant_id = $1 AND id = $2 AND user_id = $3",
        )
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .execute(&self.pool)
        .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), StoreError> {
        let applied: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = $1 AND success)",
        )
        .bind(self.latest_migration)
        .fetch_one(&self.pool)
        .await?;
        if applied {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "the database migrations are not applied (run `maestra migrate`)".to_owned(),
            ))
        }
    }
}
