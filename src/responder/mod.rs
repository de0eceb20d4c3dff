//! Who writes Maestra's replies. The offline responder works with zero configuration; a real
//! model provider plugs in behind the same trait.

mod offline;

use async_trait::async_trait;

use crate::domain::{ConversationId, Message, Usage};

pub use offline::OfflineResponder;

/// What the model sees: the conversation's recent history, oldest first, ending with the
/// user's new message, whichever surfaces wrote it.
pub struct Prompt<'a> {
    pub conversation_id: &'a ConversationId,
    pub history: &'a [Message],
}

impl Prompt<'_> {
    /// How many messages the conversation holds, the new one included (seqs count from 1).
    pub fn conversation_len(&self) -> i64 {
        self.history.last().map_or(0, |m| m.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    /// The provider answered with an error or something unreadable.
    #[error("the model provider failed: {0}")]
    Provider(String),
    /// The provider did not answer in time.
    #[error("the model provider did not answer in time")]
    Timeout,
}

impl ResponderError {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponderError::Provider(_) => "provider",
            ResponderError::Timeout => "timeout",
        }
    }
}

#[async_trait]
pub trait Responder: Send + Sync + 'static {
    async fn reply(&self, prompt: Prompt<'_>) -> Result<Reply, ResponderError>;
}
