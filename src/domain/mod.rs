//! Validated domain types. Handlers parse raw input into these once; nothing below re-checks.

mod ids;
mod message;
mod turn;
pub mod whole;

pub use ids::{ConversationId, MessageId, OriginId, SurfaceId, TenantId, UserId};
pub use message::{
    Message, MessageText, MessageTextError, NewMessage, Role, Usage, conversation_order, is_blank,
    next_created_at, to_micros,
};
pub use turn::TurnOutcome;

/// Why a piece of input was refused; `field` names it so the client knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
