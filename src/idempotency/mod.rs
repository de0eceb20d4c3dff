//! `Idempotency-Key` on the core endpoint: the same key and body within 24 h returns the first
//! response and stores nothing again; the same key with another body is refused (409).
//!
//! A record remembers how far its request got, so a retry after a provider failure continues it
//! (the user's message is already stored: only the reply is still missing) instead of storing
//! the message twice. One implementation per deployment mode, like the conversation store.

mod file;
mod postgres;

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::domain::TurnOutcome;
use crate::domain::{ConversationId, InvalidInput};
use crate::store::StoreError;

pub use file::FileIdempotency;
pub use postgres::PgIdempotency;

/// How long a key is remembered.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a request holds its key; a crashed request's key is free again after this.
pub const LEASE: Duration = Duration::from_secs(120);
const MAX_KEY_LEN: usize = 255;

/// A client's key and the fingerprint of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    key: String,
    fingerprint: String,
}

impl IdempotencyKey {
    /// The header's value, for a request whose body is `body`.
    pub fn parse(header: &str, body: &serde_json::Value) -> Result<Self, InvalidInput> {
        let key = header.trim();
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidInput::new(
                "Idempotency-Key",
                format!("must be 1-{MAX_KEY_LEN} printable characters without spaces"),
            ));
        }
        let digest = Sha256::digest(body.to_string().as_bytes());
        Ok(Self {
            key: key.to_owned(),
            fingerprint: digest.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The ids this request's turn is stored under: derived from the key and the body, so
    /// every server the request reaches (the local one, then the cloud on fallback) gives the
    /// same ones, and sync finds one turn where two servers each stored it.
    pub fn derived_ids(&self) -> DerivedIds {
        let digest = |purpose: &str| {
            let hash = Sha256::new()
                .chain_update(purpose)
                .chain_update([0])
                .chain_update(&self.key)
                .chain_update([0])
                .chain_update(&self.fingerprint)
                .finalize();
            // 128 bits, as many as a UUID.
            hash[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        DerivedIds {
            conversation_id: ConversationId::parse(&format!("conv_{}", digest("conversation")))
                .unwrap_or_else(|_| ConversationId::generate()),
            user_message: format!("msg_{}", digest("user")),
            reply: format!("msg_{}", digest("reply")),
        }
    }
}

/// The ids of a turn made with an `Idempotency-Key` (see [`IdempotencyKey::derived_ids`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedIds {
    /// For a request that names no conversation.
    pub conversation_id: ConversationId,
    pub user_message: String,
    pub reply: String,
}

/// What to do with a request that carries a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// Never seen (or forgotten): run it.
    Fresh,
    /// Done before: answer with this, and do nothing else.
    Replay(Box<TurnOutcome>),
    /// Its message was stored but it got no reply: get the reply only.
    Resume {
        conversation_id: ConversationId,
        user_seq: i64,
    },
    /// Another request holds the key right now.
    InProgress,
    /// The key was used with another body.
    Conflict,
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims the key for this request (for `LEASE`), or says why not.
    async fn begin(&self, tenant: &str, key: &IdempotencyKey) -> Result<Begin, StoreError>;
    /// The request's user message is stored.
    async fn user_stored(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<(), StoreError>;
    /// The request is answered: later ones with this key get `outcome`.
    async fn complete(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        outcome: &TurnOutcome,
    ) -> Result<(), StoreError>;
    /// The request failed: the key is free for a retry, which continues where this one stopped.
    async fn release(&self, tenant: &str, key: &IdempotencyKey) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_same_body_has_the_same_fingerprint_and_another_body_another() {
        let a = IdempotencyKey::parse("k1", &json!({"message": "hi", "user_id": "ana"})).unwrap();
        let b = IdempotencyKey::parse("k1", &json!({"message": "hi", "user_id": "ana"})).unwrap();
        let c = IdempotencyKey::parse("k1", &json!({"message": "ho", "user_id": "ana"})).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn a_key_and_body_derive_the_same_ids_everywhere_and_another_body_others() {
        let body = json!({"message": "hi", "user_id": "ana"});
        let a = IdempotencyKey::parse("k1", &body).unwrap().derived_ids();
        let again = IdempotencyKey::parse("k1", &body).unwrap().derived_ids();
        assert_eq!(a, again);
        let other = IdempotencyKey::parse("k1", &json!({"message": "ho", "user_id": "ana"}))
            .unwrap()
            .derived_ids();
        assert_ne!(a.user_message, other.user_message);
        assert_ne!(a.user_message, a.reply);
        assert!(a.conversation_id.as_str().starts_with("conv_"));
        assert!(a.user_message.starts_with("msg_") && a.user_message.len() == 36);
    }

    #[test]
    fn unusable_keys_are_refused_naming_the_header() {
        for bad in ["", "has space", &"k".repeat(256)] {
            let err = IdempotencyKey::parse(bad, &json!({})).unwrap_err();
            assert_eq!(err.field, "Idempotency-Key");
        }
    }
}
