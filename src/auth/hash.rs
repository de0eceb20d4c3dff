//! argon2id with fixed, explicit parameters. Slow on purpose (~10 ms here): callers run it on
//! the blocking pool, and the authenticator caches its verdicts.

use std::sync::LazyLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// OWASP's argon2id recommendation: 19 MiB, 2 passes, 1 lane.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`) of a key.
pub fn hash_key(key: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let hash = argon2()
        .hash_password(key.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
    Ok(hash.to_string())
}

/// A hash nobody has the key to: unknown key ids are checked against it, so that an unknown
/// id costs the same time as a known one.
static DECOY: LazyLock<Option<String>> = LazyLock::new(|| hash_key("decoy").ok());

/// Whether `key` matches `phc`; with no `phc`, does the same work and says no.
pub fn verify_key(key: &str, phc: Option<&str>) -> bool {
    let Some(phc) = phc.or(DECOY.as_deref()) else {
        return false;
    };
    let matches = PasswordHash::new(phc)
        .is_ok_and(|parsed| argon2().verify_password(key.as_bytes(), &parsed).is_ok());
    matches && phc != DECOY.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_against_its_own_hash_only() {
        let hash = hash_key("mk_secret").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(!hash.contains("mk_secret"));
        assert!(verify_key("mk_secret", Some(&hash)));
        assert!(!verify_key("mk_secreT", Some(&hash)));
        assert!(!verify_key("mk_secret", None));
        assert!(!verify_key("mk_secret", Some("not a hash")));
    }

    #[test]
    fn the_same_key_hashes_differently_each_time() {
        assert_ne!(hash_key("k").unwrap(), hash_key("k").unwrap());
    }
}
