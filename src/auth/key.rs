//! API keys as clients hold them: `mk_<id>_<secret>`. The id is public and finds the key's row
//! in one lookup; the secret is only ever stored as an argon2id hash of the whole key.
//!
//! A key in another format (the guide's `MAESTRA_API_KEY=sk_your_key_here`) gets an id derived
//! from its SHA-256, so it is found the same way.

use std::fmt;

use secrecy::SecretString;
use sha2::{Digest, Sha256};

const PREFIX: &str = "mk_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A key's public id: 12 hex digits, or `x` + 15 for keys of another format.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// The id of whatever a client presented (no check that such a key exists).
    pub fn of(presented: &str) -> KeyId {
        match embedded_id(presented) {
            Some(id) => KeyId(id.to_owned()),
            None => {
                let digest = digest(presented);
                KeyId(format!("x{}", &hex(&digest)[..15]))
            }
        }
    }

    /// An id typed by an operator (`keys revoke ID`).
    pub fn parse(text: &str) -> Option<KeyId> {
        let text = text.trim().strip_prefix(PREFIX).unwrap_or(text.trim());
        let valid_len = text.len() == ID_BYTES * 2 || (text.len() == 16 && text.starts_with('x'));
        let hex_body = text
            .trim_start_matches('x')
            .bytes()
            .all(|b| b.is_ascii_hexdigit());
        (valid_len && hex_body).then(|| KeyId(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

fn embedded_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let is_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (id.len() == ID_BYTES * 2 && secret.len() == SECRET_BYTES * 2 && is_hex(id) && is_hex(secret))
        .then_some(id)
}

/// A new key: its id, and the full key to hand to the client once.
pub fn generate() -> anyhow::Result<(KeyId, SecretString)> {
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let id = hex(&id);
    let key = format!("{PREFIX}{id}_{}", hex(&secret));
    Ok((KeyId(id), SecretString::from(key)))
}

/// A fast fingerprint of a presented key, to recognise one already verified with argon2.
pub fn digest(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn a_generated_key_carries_its_id() {
        let (id, key) = generate().unwrap();
        let key = key.expose_secret();
        assert!(key.starts_with("mk_"));
        assert_eq!(KeyId::of(key), id);
        assert_eq!(KeyId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(KeyId::parse(&format!("mk_{id}")), Some(id));
    }

    #[test]
    fn generated_keys_differ() {
        let (a, ka) = generate().unwrap();
        let (b, kb) = generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(ka.expose_secret(), kb.expose_secret());
    }

    #[test]
    fn a_key_of_another_format_gets_a_stable_derived_id() {
        let a = KeyId::of("sk_your_key_here");
        assert_eq!(a, KeyId::of("sk_your_key_here"));
        assert_ne!(a, KeyId::of("sk_your_key_herf"));
        assert!(a.as_str().starts_with('x') && a.as_str().len() == 16);
        assert_eq!(KeyId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn a_malformed_mk_key_is_treated_as_another_format() {
        let id = KeyId::of("mk_abc_def");
        assert!(id.as_str().starts_with('x'));
    }

    #[test]
    fn operator_ids_are_checked() {
        for bad in ["", "xyz", "mk_", "0123456789abz", "'; drop table"] {
            assert_eq!(KeyId::parse(bad), None, "{bad:?}");
        }
    }
}
