//! The cloud's side of sync, in Postgres: storing what installs push, and reading an owner's
//! feed for them to pull.
//!
//! Every change to an owner's conversations takes the next number of the owner's feed
//! (`owners.feed_head`), bumped under the owner's row lock: the numbers commit in order, so a
//! reader that has seen number N never later finds a change numbered below it. Pushed messages
//! and deletions are numbered in the transaction that stores them; messages written through
//! the API, by the next pull (`number_pending`), so that turns never wait on that lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};

use super::protocol::{CLOUD_ORIGIN, PullRequest, PullResponse, PushRequest, PushResponse, Record};
use crate::db::Db;
use crate::domain::{ConversationId, MessageId, SurfaceId, UserId};
use crate::store::{StoreError, role_name, role_of, usage_of};

#[derive(Clone)]
pub struct CloudSync {
    pool: Db,
}

impl CloudSync {
    pub fn new(pool: impl Into<Db>) -> Self {
        Self { pool: pool.into() }
    }

    /// Stores a push in one transaction: every record or none. Each message is stored once
    /// by id (a copy already here is kept); a message of a conversation deleted after it was
    /// written is dropped; a deletion erases what it covers.
    pub async fn push(
        &self,
        tenant: &str,
        api_key_id: Option<&str>,
        request: &PushRequest,
    ) -> Result<PushResponse, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Each owner's row is locked (in one order, so two pushes never wait for each other
        // in a circle) until the end: nothing else writes their feeds meanwhile.
        let users: BTreeSet<&UserId> = request.records.iter().map(Record::user_id).collect();
        let mut owners = HashMap::new();
        for user in users {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO owners AS o (tenant_id, user_id) VALUES ($1, $2)
                 ON CONFLICT (tenant_id, user_id) DO UPDATE SET feed_head = o.feed_head
                 RETURNING id",
            )
            .bind(tenant)
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
            owners.insert(user.clone(), id);
        }
        let mut response = PushResponse {
            accepted: request.records.len(),
            ..PushResponse::default()
        };
        let origin = request.origin.as_str();
        for record in &request.records {
            let owner = owners.get(record.user_id()).copied().unwrap_or_default();
            let (added, duplicate) = match record {
                Record::Message { .. } => {
                    store_message(&mut tx, tenant, owner, origin, api_key_id, record).await?
                }
                Record::Deletion {
                    conversation_id,
                    deleted_at,
                    ..
                } => (
                    store_deletion(&mut tx, owner, conversation_id, *deleted_at, origin).await?,
                    false,
                ),
            };
            if added {
                response.added += 1;
            } else if duplicate {
                response.duplicates += 1;
            } else {
                response.dropped += 1;
            }
        }
        tx.commit().await?;
        Ok(response)
    }

    /// The changes after each user's cursor, oldest first, at most `limit` in all; those the
    /// asking install pushed itself are left out (the cursor still moves past them).
    pub async fn pull(
        &self,
        tenant: &str,
        request: &PullRequest,
        limit: usize,
    ) -> Result<PullResponse, StoreError> {
        let mut response = PullResponse {
            records: Vec::new(),
            cursors: BTreeMap::new(),
            more: false,
        };
        for (user, &cursor) in &request.cursors {
            let remaining = limit.saturating_sub(response.records.len());
            let Some((owner, head)) = self.number_pending(tenant, user).await? else {
                response.cursors.insert(user.clone(), cursor);
                continue;
            };
            // A cursor past the head was handed out by another database (restored, or
            // replaced): everything is sent again, and the install keeps each message once.
            let after = if cursor > head { 0 } else { cursor };
            if remaining == 0 {
                response.more |= after < head;
                response.cursors.insert(user.clone(), after);
                continue;
            }
            let rows = sqlx::query(
                "(SELECT m.feed_seq, c.id AS conversation_id, m.id, m.role, m.surface_id,
                         m.content, m.created_at, m.model, m.prompt_tokens, m.completion_tokens,
                         m.cost_usd, m.origin, NULL::timestamptz AS deleted_at
                  FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
                  WHERE m.owner_id = $1 AND m.feed_seq > $2
                  ORDER BY m.feed_seq LIMIT $3)
                 UNION ALL
                 (SELECT d.feed_seq, d.conversation_id, NULL, NULL, NULL, NULL, NULL, NULL,
                         NULL, NULL, NULL, d.origin, d.deleted_at
                  FROM conversation_deletions d
                  WHERE d.owner_id = $1 AND d.feed_seq > $2
                  ORDER BY d.feed_seq LIMIT $3)
                 ORDER BY feed_seq LIMIT $3",
            )
            .bind(owner)
            .bind(after)
            .bind(remaining as i64)
            .fetch_all(&self.pool)
            .await?;
            let mut last = after;
            for row in &rows {
                last = row.try_get("feed_seq")?;
                let origin: Option<String> = row.try_get("origin")?;
                if origin.as_deref() == Some(request.origin.as_str()) {
                    continue;
                }
                response.records.push(record_of(row, user, origin)?);
            }
            response.more |= rows.len() == remaining && last < head;
            response.cursors.insert(user.clone(), last);
        }
        Ok(response)
    }

    /// Gives the owner's unnumbered messages (those written through the API) the next feed
    /// numbers, in the order they were written, and returns the owner's id and feed head.
    /// Under the owner's row lock: a number handed out is above every number already
    /// visible, and a message still being written is numbered by a later pull.
    async fn number_pending(
        &self,
        tenant: &str,
        user: &UserId,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<(i64, i64)> = sqlx::query_as(
            "SELECT id, feed_head FROM owners WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(tenant)
        .bind(user.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((owner, head)) = owner else {
            return Ok(None);
        };
        // A statement of its own, so that its snapshot, taken after the lock was granted,
        // sees what an earlier pull numbered.
        let numbered: Option<i64> = sqlx::query_scalar(
            "WITH pending AS (
                 SELECT conversation_pk, seq,
                        row_number() OVER (ORDER BY created_at, conversation_pk, seq) AS n
                 FROM messages WHERE owner_id = $1 AND feed_seq IS NULL
             ), numbered AS (
                 UPDATE messages m SET feed_seq = $2 + p.n
                 FROM pending p
                 WHERE m.conversation_pk = p.conversation_pk AND m.seq = p.seq
                     AND m.feed_seq IS NULL
                 RETURNING m.feed_seq
             )
             SELECT max(feed_seq) FROM numbered",
        )
        .bind(owner)
        .bind(head)
        .fetch_one(&mut *tx)
        .await?;
        let Some(head) = numbered else {
            return Ok(Some((owner, head)));
        };
        sqlx::query("UPDATE owners SET feed_head = $2 WHERE id = $1")
            .bind(owner)
            .bind(head)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some((owner, head)))
    }
}

/// Stores one pushed message; (added, duplicate).
async fn store_message(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    owner: i64,
    origin: &str,
    api_key_id: Option<&str>,
    record: &Record,
) -> Result<(bool, bool), StoreError> {
    let Some((user_id, conversation_id, message)) = record.clone().into_message() else {
        return Ok((false, false));
    };
    // No usage row: its cost was counted where the reply was made.
    let row = sqlx::query(
        "WITH deleted AS (
             SELECT 1 FROM conversation_deletions
             WHERE owner_id = $1 AND conversation_id = $3 AND deleted_at >= $8
         ), existing AS (
             SELECT 1 FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
             WHERE c.tenant_id = $2 AND c.user_id = $4 AND c.id = $3 AND m.id = $5
         ), owner AS (
             UPDATE owners SET feed_head = feed_head + 1
             WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM deleted)
                 AND NOT EXISTS (SELECT 1 FROM existing)
             RETURNING id, feed_head
         ), conversation AS (
             INSERT INTO conversations AS c (tenant_id, id, user_id, owner_id, last_seq,
                 last_created_at)
             SELECT $2, $3, $4, owner.id, 1, $8 FROM owner
             ON CONFLICT (tenant_id, user_id, id) DO UPDATE
                 SET last_seq = c.last_seq + 1, updated_at = now(),
                     last_created_at = GREATEST(c.last_created_at, EXCLUDED.last_created_at)
             RETURNING pk, last_seq
         ), message AS (
             INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content,
                 created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id,
                 owner_id, feed_seq, origin)
             SELECT conversation.pk, conversation.last_seq, $5, $6, $7, $9, $8, $10, $11, $12,
                 $13, $14, owner.id, owner.feed_head, $15
             FROM conversation, owner
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM message) AS added,
                (SELECT count(*) FROM existing) AS duplicate",
    )
    .bind(owner)
    .bind(tenant)
    .bind(conversation_id.as_str())
    .bind(user_id.as_str())
    .bind(&message.id)
    .bind(role_name(message.role))
    .bind(message.surface_id.as_str())
    .bind(message.created_at)
    .bind(&message.content)
    .bind(&message.model)
    .bind(message.usage.map(|u| u.prompt_tokens as i64))
    .bind(message.usage.map(|u| u.completion_tokens as i64))
    .bind(message.usage.map(|u| u.cost_usd))
    .bind(api_key_id)
    .bind(origin)
    .fetch_one(&mut **tx)
    .await?;
    let added: i64 = row.try_get("added")?;
    let duplicate: i64 = row.try_get("duplicate")?;
    Ok((added > 0, duplicate > 0))
}

/// Records a pushed deletion and erases what it covers; whether it was news.
async fn store_deletion(
    tx: &mut Transaction<'_, Postgres>,
    owner: i64,
    conversation: &ConversationId,
    deleted_at: DateTime<Utc>,
    origin: &str,
) -> Result<bool, StoreError> {
    let recorded: i64 = sqlx::query_scalar(
        "WITH owner AS (
             UPDATE owners SET feed_head = feed_head + 1
             WHERE id = $1 AND NOT EXISTS (
                 SELECT 1 FROM conversation_deletions
                 WHERE owner_id = $1 AND conversation_id = $2 AND deleted_at >= $3)
             RETURNING id, feed_head
         ), recorded AS (
             INSERT INTO conversation_deletions AS d (owner_id, conversation_id, deleted_at,
                 feed_seq, origin)
             SELECT id, $2, $3, feed_head, $4 FROM owner
             ON CONFLICT (owner_id, conversation_id) DO UPDATE
                 SET deleted_at = EXCLUDED.deleted_at, feed_seq = EXCLUDED.feed_seq,
                     origin = EXCLUDED.origin
             RETURNING 1
         )
         SELECT count(*) FROM recorded",
    )
    .bind(owner)
    .bind(conversation.as_str())
    .bind(deleted_at)
    .bind(origin)
    .fetch_one(&mut **tx)
    .await?;
    if recorded == 0 {
        return Ok(false);
    }
    // Messages written after the deletion (the id used again) stay, and so does their
    // conversation.
    sqlx::query(
        "DELETE FROM messages m USING conversations c
         WHERE c.pk = m.conversation_pk AND c.owner_id = $1 AND c.id = $2
             AND m.created_at <= $3",
    )
    .bind(owner)
    .bind(conversation.as_str())
    .bind(deleted_at)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "DELETE FROM conversations c
         WHERE c.owner_id = $1 AND c.id = $2
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_pk = c.pk)",
    )
    .bind(owner)
    .bind(conversation.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// A row of the feed as a record.
fn record_of(
    row: &sqlx::postgres::PgRow,
    user: &UserId,
    origin: Option<String>,
) -> Result<Record, StoreError> {
    let decode = |e: crate::domain::InvalidInput| StoreError::Other(anyhow::Error::from(e));
    let conversation_id = ConversationId::parse(row.try_get("conversation_id")?).map_err(decode)?;
    let origin = Some(origin.unwrap_or_else(|| CLOUD_ORIGIN.to_owned()));
    if let Some(deleted_at) = row.try_get::<Option<DateTime<Utc>>, _>("deleted_at")? {
        return Ok(Record::Deletion {
            user_id: user.clone(),
            conversation_id,
            deleted_at,
            origin,
        });
    }
    Ok(Record::Message {
        user_id: user.clone(),
        conversation_id,
        id: MessageId::parse(row.try_get("id")?).map_err(decode)?,
        role: role_of(row)?,
        surface_id: SurfaceId::parse(row.try_get("surface_id")?).map_err(decode)?,
        content: row.try_get("content")?,
        created_at: row.try_get("created_at")?,
        model: row.try_get("model")?,
        usage: usage_of(row)?,
        origin,
    })
}
