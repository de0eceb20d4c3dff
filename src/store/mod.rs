//! Where conversations live. One trait, one implementation per deployment mode; everything above
//! it is written once.

pub mod deletions;
mod file;
#[cfg(fuzzing)]
pub(crate) mod fuzzing;
mod id_index;
mod journal;
mod measured;
mod postgres;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{ConversationId, Message, NewMessage, UserId};
use crate::usage_log::UsageRecord;

pub use file::{Applied, FileCursor, FileStore, create_private_dir};
pub use measured::MeasuredStore;
pub use postgres::{PgStore, is_unavailable};
pub(crate) use postgres::{role_name, role_of, usage_of};

/// Who may see a conversation: the user, within a tenant (local mode has one tenant).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub tenant: String,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversationSummary {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such conversation for this owner (it may exist for another: that is not told).
    #[error("conversation not found")]
    NotFound,
    /// The storage cannot be reached or written right now; retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The disk holding the data (or the user's quota on it) is full: nothing of the write was
    /// kept, and retrying once space is freed succeeds. Local mode.
    #[error("storage full: {0}")]
    Full(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What a reply cost, for the cost ledger: the line also takes the reply's model, tokens, price
/// and time, and its conversation.
#[derive(Debug, Clone)]
pub struct Priced {
    pub request_id: String,
    pub user_id: UserId,
    pub surface_id: String,
    /// From the request's start until its reply was ready to store.
    pub latency_ms: f64,
}

/// A message handed to [`ConversationStore::append_once`], as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub message: Message,
    /// The message's id was already in the conversation: this is the copy found there, and
    /// nothing new was stored.
    pub existed: bool,
}

#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    /// Appends a message, durably, and returns it with its seq and time. The conversation is
    /// created for `owner` when it does not exist yet. A message with an id the conversation
    /// already holds is not stored again: the stored one comes back. Local mode: another
    /// owner's conversation is `NotFound` (one file per id); cloud mode scopes ids by owner.
    async fn append_once(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
    ) -> Result<Appended, StoreError>;

    /// `append_once`, for the stored message alone.
    async fn append(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
    ) -> Result<Message, StoreError> {
        Ok(self
            .append_once(owner, conversation, message)
            .await?
            .message)
    }

    /// `append_once` for a turn's question, with the history the model is then asked with:
    /// the conversation's last `limit` messages once it is stored, as `recent` reads them. A
    /// store may do both in one step.
    async fn append_question(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        question: NewMessage,
        limit: usize,
    ) -> Result<(Appended, Vec<Message>), StoreError> {
        let appended = self.append_once(owner, conversation, question).await?;
        let history = self.recent(owner, conversation, limit).await?;
        Ok((appended, history))
    }

    /// `append_once` for a turn's reply. A store that keeps the cost ledger (local mode) writes
    /// the reply's line in the same durable step, so that every reply it stores has exactly
    /// one; a reply already stored (`existed`) gets none. Other stores keep no ledger.
    async fn append_reply(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        reply: NewMessage,
        priced: Priced,
    ) -> Result<Appended, StoreError> {
        let _ = priced;
        self.append_once(owner, conversation, reply).await
    }

    /// The ledger line of an answer that is not stored (the legacy advisor's), durably, where
    /// the store keeps the ledger.
    async fn record_cost(&self, record: &UsageRecord<'_>) -> Result<(), StoreError> {
        let _ = record;
        Ok(())
    }

    /// The message with this id, if the owner's conversation holds it.
    async fn find(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError>;

    /// The last `limit` messages to arrive, in seq order (callers put them in the
    /// conversation's order, `domain::conversation_order`).
    async fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// Messages with seq greater than `after_seq`, in seq order, at most `limit`.
    async fn messages(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// The owner's conversations, most recently updated first.
    async fn list(
        &self,
        owner: &Owner,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError>;

    /// Erases the conversation and all its messages, and remembers that it did (for sync).
    async fn delete(&self, owner: &Owner, conversation: &ConversationId) -> Result<(), StoreError>;

    /// Whether the storage can be used right now (cheap: `/health` calls it).
    async fn check(&self) -> Result<(), StoreError>;
}
