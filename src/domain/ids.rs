//! Identifiers that arrive from clients. Their character sets are closed so that an id can
//! never be a path, a query fragment or a control character.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::InvalidInput;

const MAX_ID_LEN: usize = 128;

fn parse_token(
    field: &'static str,
    value: &str,
    allowed: fn(char) -> bool,
    charset: &str,
) -> Result<String, InvalidInput> {
    if value.is_empty() || value.len() > MAX_ID_LEN || !value.chars().all(allowed) {
        return Err(InvalidInput::new(
            field,
            format!("must be 1-{MAX_ID_LEN} characters of {charset}"),
        ));
    }
    Ok(value.to_owned())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')
}

fn is_conversation_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $allowed:expr, $charset:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, InvalidInput> {
                parse_token($field, value, $allowed, $charset).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidInput;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// Who a conversation belongs to (within a tenant).
    UserId, "user_id", is_name_char, "A-Z a-z 0-9 . _ @ -"
);
id_type!(
    /// A cloud-mode customer: its keys, conversations and usage are its own.
    TenantId, "tenant", is_name_char, "A-Z a-z 0-9 . _ @ -"
);
id_type!(
    /// Which client wrote a message: `windsurf`, `browser_ext`, `cli`, `mobile`, ...
    SurfaceId, "surface_id", is_name_char, "A-Z a-z 0-9 . _ @ -"
);
id_type!(
    /// A conversation's id. Also the conversation's file name in local mode, hence no `.` or `/`.
    ConversationId, "conversation_id", is_conversation_char, "A-Z a-z 0-9 _ -"
);

id_type!(
    /// A message's id: the same on every server that holds the message.
    MessageId, "id", is_conversation_char, "A-Z a-z 0-9 _ -"
);
id_type!(
    /// A local install, as sync names it (its records' origin).
    OriginId, "origin", is_conversation_char, "A-Z a-z 0-9 _ -"
);

impl ConversationId {
    /// A fresh id for a conversation the client did not name.
    pub fn generate() -> Self {
        Self(format!("conv_{}", uuid::Uuid::now_v7().simple()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typical_user_id_is_accepted() {
        assert!(UserId::parse("justin.harmon@8825-core_1").is_ok());
    }

    #[test]
    fn an_empty_id_is_rejected_naming_its_field() {
        let err = UserId::parse("").unwrap_err();
        assert_eq!(err.field, "user_id");
    }

    #[test]
    fn an_id_longer_than_128_characters_is_rejected() {
        assert!(SurfaceId::parse(&"a".repeat(128)).is_ok());
        assert!(SurfaceId::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn a_conversation_id_cannot_name_a_path() {
        for bad in ["../etc", "a/b", "a\0b", ".", "..", "conv.json", "a b", "é"] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn generated_conversation_ids_are_valid_and_distinct() {
        let a = ConversationId::generate();
        let b = ConversationId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("conv_"));
        assert!(ConversationId::parse(a.as_str()).is_ok());
    }
}
