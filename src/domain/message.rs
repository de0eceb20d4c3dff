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
    #[serde(deserialize_with = "super::whole::count")]
    pub prompt_tokens: u64,
    #[serde(deserialize_with = "super::whole::count")]
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// A message as stored. `id` is the same on every server that holds it; `seq` (1, 2, 3, ...) is
/// the order in which it arrived on this one, and never changes. A conversation's order is
/// `(created_at, id)` (see [`conversation_order`]), the same on every server once they synced.
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
    /// Where the message was written when it came here through sync: `cloud`, or the id of
    /// the local install that wrote it. `None`: written on this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl Message {
    /// Whether `other` is the same message with the same contents (its seq and origin aside:
    /// those are each server's own).
    pub fn same_contents(&self, other: &Message) -> bool {
        self.id == other.id
            && self.role == other.role
            && self.surface_id == other.surface_id
            && self.content == other.content
            && self.created_at == other.created_at
            && self.model == other.model
            && self.usage == other.usage
    }
}

/// Sorts messages into their conversation's order: by `created_at`, then `id`. Every server
/// sorts the same way, so once synced they list a conversation identically.
pub fn conversation_order(messages: &mut [Message]) {
    messages.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
}

/// The time stamped on a new message of a conversation whose newest message is stamped `last`:
/// now (to the microsecond, which both stores keep), but always after `last`. A message is
/// thus stamped after everything its server had of the conversation when it was written, even
/// when the clock of the server that wrote `last` ran ahead (a hybrid logical clock, kept per
/// conversation).
pub fn next_created_at(last: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let now = to_micros(Utc::now());
    match last {
        // The clock's end (a damaged file's time) stays where it is rather than overflow.
        Some(last) if last >= now => last
            .checked_add_signed(chrono::Duration::microseconds(1))
            .unwrap_or(last),
        _ => now,
    }
}

/// `at`, cut to whole microseconds.
pub fn to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// A message about to be stored; the store gives it its seq and time, and its id unless it
/// has one (see [`NewMessage::with_id`]).
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Set when the id is derived from the request (an `Idempotency-Key`): storing it again
    /// then finds the first copy instead of making a second.
    pub id: Option<String>,
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
            id: None,
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
            id: None,
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

    pub fn with_id(mut self, id: Option<String>) -> Self {
        self.id = id;
        self
    }

    /// Gives the message its place in the conversation and its time.
    pub fn into_message(self, seq: i64, created_at: DateTime<Utc>) -> Message {
        Message {
            id: self
                .id
                .unwrap_or_else(|| format!("msg_{}", uuid::Uuid::now_v7().simple())),
            seq,
            role: self.role,
            surface_id: self.surface_id,
            content: self.content,
            created_at,
            model: self.model,
            usage: self.usage,
            origin: None,
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
    fn a_new_message_is_stamped_after_the_newest_even_when_that_one_is_in_the_future() {
        let ahead = Utc::now() + chrono::Duration::minutes(5);
        let stamped = next_created_at(Some(ahead));
        assert_eq!(stamped, ahead + chrono::Duration::microseconds(1));
        let past = Utc::now() - chrono::Duration::minutes(5);
        let now = next_created_at(Some(past));
        assert!(now > past + chrono::Duration::minutes(4));
        assert_eq!(now, to_micros(now), "kept to the microsecond");
    }

    #[test]
    fn a_conversation_is_ordered_by_time_then_id() {
        let at = to_micros(Utc::now());
        let message = |id: &str, seq: i64, created_at| Message {
            id: id.to_owned(),
            seq,
            role: Role::User,
            surface_id: SurfaceId::parse("cli").unwrap(),
            content: String::new(),
            created_at,
            model: None,
            usage: None,
            origin: None,
        };
        let mut messages = vec![
            message("msg_b", 1, at),
            message("msg_c", 2, at - chrono::Duration::seconds(1)),
            message("msg_a", 3, at),
        ];
        conversation_order(&mut messages);
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["msg_c", "msg_a", "msg_b"]);
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
