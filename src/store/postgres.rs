//! Cloud mode's store: conversations and messages in Postgres.
//!
//! An append is one statement: it bumps the conversation row (whose lock orders concurrent
//! writers; a new conversation is created, with its owner, by a second one), inserts the
//! message with the new seq and, for a reply, its usage row, all in one implicit transaction.
//! A question's append also answers the messages before it. Every query is scoped by tenant
//! and user: a conversation is (tenant, user, id), so two users' `conv_demo` are two
//! conversations.

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{FromRow, Postgres, Row};

use super::{Appended, ConversationStore, ConversationSummary, Owner, StoreError};
use crate::db::Db;
use crate::domain::{ConversationId, Message, NewMessage, Role, SurfaceId, Usage, UserId};

#[derive(Clone)]
pub struct PgStore {
    pool: Db,
    /// The newest migration this build knows: the store is usable once it is applied.
    latest_migration: i64,
}

impl PgStore {
    pub fn pool(&self) -> &Db {
        &self.pool
    }

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

pub(crate) const MESSAGE_COLUMNS: &str = "m.id, m.seq, m.role, m.surface_id, m.content, \
     m.created_at, m.model, m.prompt_tokens, m.completion_tokens, m.cost_usd, m.origin";

/// The owner's conversation, as a `WHERE` clause on `c` (tenant $1, conversation $2, user $3).
const OWNED: &str = "c.tenant_id = $1 AND c.id = $2 AND c.user_id = $3";

impl<'r> FromRow<'r, PgRow> for Message {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let decode = |column: &str, e: crate::domain::InvalidInput| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: Box::new(e),
        };
        Ok(Message {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            role: role_of(row)?,
            surface_id: SurfaceId::parse(row.try_get("surface_id")?)
                .map_err(|e| decode("surface_id", e))?,
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
            model: row.try_get("model")?,
            usage: usage_of(row)?,
            origin: row.try_get("origin")?,
        })
    }
}

/// A message row's role.
pub(crate) fn role_of(row: &PgRow) -> Result<Role, sqlx::Error> {
    Ok(match row.try_get::<&str, _>("role")? {
        "user" => Role::User,
        _ => Role::Assistant,
    })
}

/// A message row's usage (replies only).
pub(crate) fn usage_of(row: &PgRow) -> Result<Option<Usage>, sqlx::Error> {
    let prompt_tokens: Option<i64> = row.try_get("prompt_tokens")?;
    let completion_tokens: Option<i64> = row.try_get("completion_tokens")?;
    let cost_usd: Option<f64> = row.try_get("cost_usd")?;
    Ok(match (prompt_tokens, completion_tokens, cost_usd) {
        (Some(p), Some(c), Some(cost)) => Some(Usage {
            prompt_tokens: u64::try_from(p).unwrap_or_default(),
            completion_tokens: u64::try_from(c).unwrap_or_default(),
            cost_usd: cost,
        }),
        _ => None,
    })
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

/// Whether a statement failed on a unique constraint (a concurrent writer stored the same).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl PgStore {
    /// The owner's message `id` in `conversation`, if stored.
    async fn stored(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             JOIN conversations c ON c.pk = m.conversation_pk
             WHERE {OWNED} AND m.id = $4"
        ))
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Appends `new` with the first of `statements` (append statements, below) that finds or
    /// makes its conversation.
    async fn insert(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        new: &NewMessage,
        statements: &[&str],
    ) -> Result<Message, sqlx::Error> {
        // Seq and time come from the database: the time is its clock's (the same for every
        // replica), but always after the conversation's newest message and after a deletion
        // of the same id (see `domain::next_created_at`). The message takes no feed number
        // here: the next sync pull numbers it (migration 20261207000001).
        let message = new.clone().into_message(0, Utc::now());
        // Most messages go to a conversation that exists: one update of its row, whose lock
        // orders concurrent writers, and the inserts. A new conversation takes a second
        // statement that creates it (and its owner) first.
        let mut row = None;
        for statement in statements {
            row = append_query(statement, owner, conversation, &message, new)
                .fetch_optional(&self.pool)
                .await?;
            if row.is_some() {
                break;
            }
        }
        let row = row.ok_or(sqlx::Error::RowNotFound)?;
        Ok(Message {
            seq: row.try_get("seq")?,
            created_at: row.try_get("created_at")?,
            ..message
        })
    }

    /// An unkeyed question appended to a conversation that exists, with the `limit - 1`
    /// messages before it, in one statement; `None` (nothing stored) when the conversation
    /// does not exist yet. The history is `None` when a concurrent writer's message committed
    /// while this one waited for the conversation's row: the statement's snapshot, taken
    /// before, lacks it.
    async fn append_question_at_once(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        question: &NewMessage,
        limit: usize,
    ) -> Result<Option<(Message, Option<Vec<Message>>)>, sqlx::Error> {
        let message = question.clone().into_message(0, Utc::now());
        let rows = append_query(&APPEND_QUESTION, owner, conversation, &message, question)
            .bind(limit.saturating_sub(1) as i64)
            .fetch_all(&self.pool)
            .await?;
        let Some((new, before)) = rows.split_first() else {
            return Ok(None);
        };
        let message = Message {
            seq: new.try_get("seq")?,
            created_at: new.try_get("created_at")?,
            ..message
        };
        let mut history = before
            .iter()
            .map(Message::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let follows_on = match history.first() {
            Some(previous) => previous.seq == message.seq - 1,
            None => limit == 1,
        };
        if !follows_on {
            return Ok(Some((message, None)));
        }
        history.reverse();
        history.push(message.clone());
        Ok(Some((message, Some(history))))
    }
}

/// `statement` (one of the appends below) with the message's parameters, $1 to $13.
fn append_query<'q>(
    statement: &'q str,
    owner: &'q Owner,
    conversation: &'q ConversationId,
    message: &'q Message,
    new: &'q NewMessage,
) -> Query<'q, Postgres, PgArguments> {
    let usage = message.usage.filter(|_| message.model.is_some());
    sqlx::query(statement)
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .bind(&message.id)
        .bind(role_name(message.role))
        .bind(message.surface_id.as_str())
        .bind(&message.content)
        .bind(&message.model)
        .bind(usage.map(|u| u.prompt_tokens as i64))
        .bind(usage.map(|u| u.completion_tokens as i64))
        .bind(usage.map(|u| u.cost_usd))
        .bind(&new.api_key_id)
        .bind(usage.is_some())
}

/// Statements that append a message: a `conversation` step (which of the two below) and then
/// [`MESSAGE_CTES`]; they answer the message's seq and time.
static APPEND_TO_EXISTING: LazyLock<String> = LazyLock::new(|| {
    format!("{EXISTING_CONVERSATION}{MESSAGE_CTES} SELECT seq, created_at FROM message")
});
static APPEND_CREATING: LazyLock<String> = LazyLock::new(|| {
    format!("{CREATING_CONVERSATION}{MESSAGE_CTES} SELECT seq, created_at FROM message")
});
/// [`APPEND_TO_EXISTING`], answering first the message's seq and time, then the messages
/// before it, newest first, at most $14 (the snapshot's: those committed before it began).
/// The conversation's key as a value (not a join), so that the plan walks the primary key
/// back from the newest message however long the conversation is.
static APPEND_QUESTION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{EXISTING_CONVERSATION}{MESSAGE_CTES}
         SELECT * FROM (
             SELECT 0 AS part, NULL::text AS id, seq, NULL::text AS role,
                 NULL::text AS surface_id, NULL::text AS content, created_at, NULL::text AS model,
                 NULL::bigint AS prompt_tokens, NULL::bigint AS completion_tokens,
                 NULL::float8 AS cost_usd, NULL::text AS origin
             FROM message
             UNION ALL
             (SELECT 1, {MESSAGE_COLUMNS} FROM messages m
              WHERE m.conversation_pk = (SELECT pk FROM conversation)
              ORDER BY m.seq DESC LIMIT $14)
         ) rows ORDER BY part, seq DESC"
    )
});

/// The `conversation` of an append when it exists: its row bumped (no row when it does not).
/// Parameters, here and below: tenant $1, conversation $2, user $3.
const EXISTING_CONVERSATION: &str = "WITH conversation AS (
         UPDATE conversations c
         SET last_seq = c.last_seq + 1, updated_at = now(),
             last_created_at = GREATEST(now(), c.last_created_at + interval '1 microsecond')
         WHERE c.tenant_id = $1 AND c.id = $2 AND c.user_id = $3
         RETURNING pk, owner_id, last_seq, last_created_at
     )";

/// The `conversation` of an append that creates it, and its owner if new; a concurrent
/// creator's row is bumped instead.
const CREATING_CONVERSATION: &str = "WITH owner AS (
         INSERT INTO owners AS o (tenant_id, user_id) VALUES ($1, $3)
         ON CONFLICT (tenant_id, user_id) DO UPDATE SET feed_head = o.feed_head
         RETURNING id
     ), conversation AS (
         INSERT INTO conversations AS c (tenant_id, id, user_id, owner_id, last_seq,
             last_created_at)
         SELECT $1, $2, $3, owner.id, 1, GREATEST(now(),
             (SELECT d.deleted_at + interval '1 microsecond' FROM conversation_deletions d
              WHERE d.owner_id = owner.id AND d.conversation_id = $2))
         FROM owner
         ON CONFLICT (tenant_id, user_id, id) DO UPDATE
             SET last_seq = c.last_seq + 1, updated_at = now(),
                 last_created_at = GREATEST(EXCLUDED.last_created_at,
                     c.last_created_at + interval '1 microsecond')
         RETURNING pk, owner_id, last_seq, last_created_at
     )";

/// The message (id $4, role $5, surface $6, content $7, model $8, tokens $9 and $10, cost
/// $11, key $12) at the `conversation`'s new seq, and for a reply ($13) its usage row.
const MESSAGE_CTES: &str = ", message AS (
         INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at,
             model, prompt_tokens, completion_tokens, cost_usd, api_key_id, owner_id)
         SELECT pk, last_seq, $4, $5, $6, $7, last_created_at, $8, $9, $10, $11, $12, owner_id
         FROM conversation
         RETURNING seq, created_at
     ), usage_row AS (
         INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id, surface_id,
             model, prompt_tokens, completion_tokens, cost_usd)
         SELECT message.created_at, $1, $12, $3, $2, $6, $8, $9, $10, $11
         FROM message WHERE $13
     )";

#[async_trait]
impl ConversationStore for PgStore {
    async fn append_once(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
    ) -> Result<Appended, StoreError> {
        if let Some(id) = &new.id
            && let Some(found) = self.stored(owner, conversation, id).await?
        {
            return Ok(Appended {
                message: found,
                existed: true,
            });
        }
        let statements = [APPEND_TO_EXISTING.as_str(), APPEND_CREATING.as_str()];
        match self.insert(owner, conversation, &new, &statements).await {
            Ok(message) => Ok(Appended {
                message,
                existed: false,
            }),
            // The same id, stored meanwhile by a concurrent request (or a sync push).
            Err(e) if is_unique_violation(&e) && new.id.is_some() => {
                let id = new.id.as_deref().unwrap_or_default();
                match self.stored(owner, conversation, id).await? {
                    Some(found) => Ok(Appended {
                        message: found,
                        existed: true,
                    }),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn append_question(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        question: NewMessage,
        limit: usize,
    ) -> Result<(Appended, Vec<Message>), StoreError> {
        // A keyed question may be stored already: `append_once` looks first.
        if question.id.is_none() && limit > 0 {
            let (message, history) = match self
                .append_question_at_once(owner, conversation, &question, limit)
                .await?
            {
                Some((message, history)) => (message, history),
                // A new conversation (or a concurrent creator's, appended to).
                None => {
                    let creating = [APPEND_CREATING.as_str()];
                    let message = self
                        .insert(owner, conversation, &question, &creating)
                        .await?;
                    (message, None)
                }
            };
            let history = match history {
                Some(history) => history,
                None => self.recent(owner, conversation, limit).await?,
            };
            let appended = Appended {
                message,
                existed: false,
            };
            return Ok((appended, history));
        }
        let appended = self.append_once(owner, conversation, question).await?;
        let history = self.recent(owner, conversation, limit).await?;
        Ok((appended, history))
    }

    async fn find(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        self.stored(owner, conversation, id).await
    }

    async fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut messages: Vec<Message> = sqlx::query_as(&format!(
            // The conversation's key as a value, not a join: a join may be planned as a scan
            // of every message when the planner thinks the conversation is a large share.
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             WHERE m.conversation_pk = (SELECT c.pk FROM conversations c WHERE {OWNED})
             ORDER BY m.seq DESC LIMIT $4"
        ))
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        // A conversation always holds a message: none means none of the owner's.
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
        let pk: Option<i64> =
            sqlx::query_scalar(&format!("SELECT c.pk FROM conversations c WHERE {OWNED}"))
                .bind(&owner.tenant)
                .bind(conversation.as_str())
                .bind(owner.user_id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let pk = pk.ok_or(StoreError::NotFound)?;
        Ok(sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             WHERE m.conversation_pk = $1 AND m.seq > $2
             ORDER BY m.seq LIMIT $3"
        ))
        .bind(pk)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
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
        // Its messages go with it (ON DELETE CASCADE), and its deletion is remembered in the
        // owner's feed, stamped after its newest message, all in this one statement.
        let deleted: i64 = sqlx::query_scalar(
            "WITH owner AS (
                 UPDATE owners SET feed_head = feed_head + 1
                 WHERE tenant_id = $1 AND user_id = $3
                 RETURNING id, feed_head
             ), gone AS (
                 DELETE FROM conversations c USING owner
                 WHERE c.tenant_id = $1 AND c.id = $2 AND c.user_id = $3
                 RETURNING owner.id AS owner_id, owner.feed_head,
                     GREATEST(now(), c.last_created_at + interval '1 microsecond') AS deleted_at
             ), deletion AS (
                 INSERT INTO conversation_deletions AS d (owner_id, conversation_id, deleted_at,
                     feed_seq, origin)
                 SELECT owner_id, $2, deleted_at, feed_head, NULL FROM gone
                 ON CONFLICT (owner_id, conversation_id) DO UPDATE
                     SET deleted_at = GREATEST(d.deleted_at, EXCLUDED.deleted_at),
                         feed_seq = EXCLUDED.feed_seq, origin = NULL
             )
             SELECT count(*) FROM gone",
        )
        .bind(&owner.tenant)
        .bind(conversation.as_str())
        .bind(owner.user_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        if deleted == 0 {
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
