//! What a conversation turn answers: kept by `idempotency` so that a repeat gets it again.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ConversationId, Message, SurfaceId, Usage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnOutcome {
    pub reply: String,
    pub conversation_id: ConversationId,
    pub message_id: String,
    pub seq: i64,
    pub surface_id: SurfaceId,
    pub model: String,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
    /// Time spent waiting for the responder (the model provider), in milliseconds.
    pub provider_ms: f64,
}

impl TurnOutcome {
    /// The answer a stored reply gives again (no model call was made for it now).
    pub fn of_stored_reply(
        conversation_id: ConversationId,
        surface_id: SurfaceId,
        reply: Message,
    ) -> Self {
        Self {
            reply: reply.content,
            conversation_id,
            message_id: reply.id,
            seq: reply.seq,
            surface_id,
            model: reply.model.unwrap_or_default(),
            usage: reply.usage.unwrap_or_default(),
            created_at: reply.created_at,
            provider_ms: 0.0,
        }
    }
}
