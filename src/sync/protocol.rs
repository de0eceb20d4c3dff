//! What a local install and the cloud say to each other, on both sides of the wire.
//!
//! `POST /api/maestra/sync/push`: the install sends the messages written on it and the
//! conversations deleted on it; the cloud stores each once (by message id) and answers what it
//! did. `POST /api/maestra/sync/pull`: the install sends, per user, the position in that
//! user's feed it has read up to; the cloud answers the messages and deletions after it (those
//! the install itself pushed left out) and the new positions.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    ConversationId, InvalidInput, Message, MessageId, OriginId, Role, SurfaceId, Usage, UserId,
    whole,
};
use crate::store::deletions::Deletion;

/// The origin of what was written in the cloud itself, in pulled records.
pub const CLOUD_ORIGIN: &str = "cloud";
/// Records in one push, and in one pull's answer, at most.
pub const MAX_RECORDS: usize = 500;
/// The largest body a push may have: room for `MAX_RECORDS` ordinary messages, or a few very
/// long replies (an install sends less per request, see `sync::local`).
pub const MAX_PUSH_BYTES: usize = 8 << 20;
/// A message's text in a record, at most (replies may be far longer than a user's message).
pub const MAX_CONTENT_BYTES: usize = 1 << 20;
const MAX_MODEL_LEN: usize = 256;
/// Users in one pull, at most.
pub const MAX_USERS: usize = 100;

/// A change to one of a user's conversations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A message, as its writer stored it.
    Message {
        user_id: UserId,
        conversation_id: ConversationId,
        id: MessageId,
        role: Role,
        surface_id: SurfaceId,
        content: String,
        created_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
        /// Pulled records: where it was written (`cloud`, or an install's id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// A conversation deleted: its messages stamped up to `deleted_at` are erased.
    Deletion {
        user_id: UserId,
        conversation_id: ConversationId,
        deleted_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
}

impl Record {
    pub fn user_id(&self) -> &UserId {
        match self {
            Record::Message { user_id, .. } | Record::Deletion { user_id, .. } => user_id,
        }
    }

    pub fn conversation_id(&self) -> &ConversationId {
        match self {
            Record::Message {
                conversation_id, ..
            }
            | Record::Deletion {
                conversation_id, ..
            } => conversation_id,
        }
    }

    /// A message stored here, as a record (`origin` says where it was written).
    pub fn of_message(
        user_id: UserId,
        conversation_id: ConversationId,
        message: Message,
    ) -> Result<Self, InvalidInput> {
        Ok(Record::Message {
            user_id,
            conversation_id,
            id: MessageId::parse(&message.id)?,
            role: message.role,
            surface_id: message.surface_id,
            content: message.content,
            created_at: message.created_at,
            model: message.model,
            usage: message.usage,
            origin: message.origin,
        })
    }

    /// A message record as the message it carries (seq 0: the receiver numbers it; origin
    /// `cloud` when the record names none), with its owner and conversation.
    pub fn into_message(self) -> Option<(UserId, ConversationId, Message)> {
        let Record::Message {
            user_id,
            conversation_id,
            id,
            role,
            surface_id,
            content,
            created_at,
            model,
            usage,
            origin,
        } = self
        else {
            return None;
        };
        let message = Message {
            id: id.into(),
            seq: 0,
            role,
            surface_id,
            content,
            created_at,
            model,
            usage,
            origin: Some(origin.unwrap_or_else(|| CLOUD_ORIGIN.to_owned())),
        };
        Some((user_id, conversation_id, message))
    }

    pub fn of_deletion(deletion: Deletion) -> Self {
        Record::Deletion {
            user_id: deletion.user_id,
            conversation_id: deletion.conversation_id,
            deleted_at: deletion.deleted_at,
            origin: deletion.origin,
        }
    }

    /// What the types alone do not say: sizes, and usage figures that are numbers.
    pub fn check(&self) -> Result<(), InvalidInput> {
        let Record::Message {
            content,
            model,
            usage,
            ..
        } = self
        else {
            return Ok(());
        };
        if content.len() > MAX_CONTENT_BYTES {
            return Err(InvalidInput::new(
                "content",
                format!("larger than {MAX_CONTENT_BYTES} bytes"),
            ));
        }
        if model.as_ref().is_some_and(|m| m.len() > MAX_MODEL_LEN) {
            return Err(InvalidInput::new(
                "model",
                format!("longer than {MAX_MODEL_LEN} bytes"),
            ));
        }
        if usage.is_some_and(|u| !u.cost_usd.is_finite() || u.cost_usd < 0.0) {
            return Err(InvalidInput::new(
                "usage.cost_usd",
                "must be a number, 0 or more",
            ));
        }
        Ok(())
    }
}

/// An install's changes, oldest first. Unknown fields are ignored, here and in records, so
/// that a newer install can talk to an older cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRequest {
    /// The install that sends them.
    pub origin: OriginId,
    pub records: Vec<Record>,
}

/// What the cloud did with a push. A push sent again changes nothing: every record then
/// counts as a duplicate (or as dropped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// Records taken (all of them: a push is stored whole or not at all).
    pub accepted: usize,
    /// Messages stored, and deletions carried out.
    pub added: usize,
    /// Messages already stored under their id (the cloud's copy is kept).
    pub duplicates: usize,
    /// Messages of a conversation deleted after they were written, and deletions already
    /// known: nothing to do.
    pub dropped: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    /// The install that asks: what it pushed itself is left out.
    pub origin: OriginId,
    /// Per user, the feed position read up to (0: nothing yet).
    #[serde(deserialize_with = "whole::positions")]
    pub cursors: BTreeMap<UserId, i64>,
    /// Records wanted at most (1-500, default 500).
    #[serde(
        default,
        deserialize_with = "whole::optional_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullResponse {
    /// Each user's records in feed order.
    pub records: Vec<Record>,
    /// Per user, the position to ask from next time.
    pub cursors: BTreeMap<UserId, i64>,
    /// Whether more records wait: ask again.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        let record = Record::Message {
            user_id: UserId::parse("ana").unwrap(),
            conversation_id: ConversationId::parse("conv_a").unwrap(),
            id: MessageId::parse("msg_1").unwrap(),
            role: Role::Assistant,
            surface_id: SurfaceId::parse("cli").unwrap(),
            content: "hi".to_owned(),
            created_at: crate::domain::to_micros(Utc::now()),
            model: Some("m".to_owned()),
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cost_usd: 0.5,
            }),
            origin: None,
        };
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.starts_with(r#"{"kind":"message""#));
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), record);
    }

    #[test]
    fn records_with_unknown_kinds_or_bad_ids_are_refused_and_unknown_fields_ignored() {
        let base = json!({"kind": "deletion", "user_id": "ana", "conversation_id": "conv_a",
                          "deleted_at": "2026-12-01T00:00:00Z"});
        assert!(serde_json::from_value::<Record>(base.clone()).is_ok());
        for (field, value) in [
            ("kind", json!("rename")),
            ("user_id", json!("../x")),
            ("conversation_id", json!("a/b")),
            ("deleted_at", json!("yesterday")),
        ] {
            let mut bad = base.clone();
            bad[field] = value;
            assert!(
                serde_json::from_value::<Record>(bad).is_err(),
                "{field} was accepted"
            );
        }
        let mut newer = base.clone();
        newer["a_field_of_tomorrow"] = json!(1);
        assert!(serde_json::from_value::<Record>(newer).is_ok());
    }
}
