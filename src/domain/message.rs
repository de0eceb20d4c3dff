//! Messages: what a user sends, and what the store keeps.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{InvalidInput, SurfaceId};

/// A user's message text: not blank, and no larger than the configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText(String);

/// Why a message text was refused. Oversize is its own case: it answers 413, not 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageTextError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("message: larger than the limit of {max_bytes} bytes")]
    TooLarge { max_bytes: usize },
}

/// Whether a text holds nothing but white space (Unicode's, plus the byte-order mark, so that
/// the OpenAPI document's `[^\s\u0085]` pattern says exactly the same).
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c == '\u{feff}')
}

impl MessageText {
    pub fn parse(value: String, max_bytes: usize) -> Result<Self, MessageTextError> {
        if is_blank(&value) {
            return Err(InvalidInput::new("message", "must not be blank").into());
        }
        if value.len() > max_bytes {
            return Err(MessageTextError::TooLarge { max_bytes });
        }
        Ok(Self(value))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// Tokens and their price for one model call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// A message as stored: ordered within its conversation by `seq` (1, 2, 3, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub seq: i64,
    pub role: Role,
    pub surface_id: SurfaceId,
    pub content: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A message about to be stored; the store gives it its id, seq and time.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: Role,
    pub surface_id: SurfaceId,
    pub content: String,
    pub model: Option<String>,
    pub usage: Option<Usage>,
    /// Cloud mode: the API key that wrote it, kept for audit and usage accounting.
    pub api_key_id: Option<String>,
}

impl NewMessage {
    pub fn from_user(surface_id: SurfaceId, text: MessageText) -> Self {
        Self {
            role: Role::User,
            surface_id,
            content: text.into_inner(),
            model: None,
            usage: None,
            api_key_id: None,
        }
    }

    pub fn from_assistant(
        surface_id: SurfaceId,
        content: String,
        model: String,
        usage: Usage,
    ) -> Self {
        Self {
            role: Role::Assistant,
            surface_id,
            content,
            model: Some(model),
            usage: Some(usage),
            api_key_id: None,
        }
    }

    pub fn written_by(mut self, api_key_id: Option<String>) -> Self {
        self.api_key_id = api_key_id;
        self
    }

    /// Gives the message its place in the conversation.
    pub fn into_message(self, seq: i64) -> Message {
        Message {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            seq,
            role: self.role,
            surface_id: self.surface_id,
            content: self.content,
            created_at: Utc::now(),
            model: self.model,
            usage: self.usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_message_is_rejected() {
        for blank in ["", "   ", "\n\t ", "\u{b}", "\u{85}\u{feff}\u{3000}"] {
            let err = MessageText::parse(blank.to_owned(), 100).unwrap_err();
            assert!(matches!(err, MessageTextError::Invalid(ref e) if e.field == "message"));
        }
    }

    #[test]
    fn a_message_over_the_limit_is_too_large() {
        assert!(MessageText::parse("a".repeat(10), 10).is_ok());
        assert_eq!(
            MessageText::parse("a".repeat(11), 10).unwrap_err(),
            MessageTextError::TooLarge { max_bytes: 10 }
        );
    }
}
