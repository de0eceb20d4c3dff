//! argon2id with fixed, explicit parameters. Slow on purpose (~10 ms here): callers run it on
//! the blocking pool, and the authenticator caches its verdicts.

use std::sync::{LazyLock, Mutex, PoisonError};

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

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
        .ok()
        .and_then(|parsed| matches(key, &parsed))
        .unwrap_or(false);
    matches && phc != DECOY.as_deref().unwrap_or_default()
}

/// The memory argon2 works in (19 MiB), allocated once and reused. A fresh allocation per
/// run stays cached in the allocator's arena of the thread that ran it, so the server grew by
/// 19 MiB for every blocking thread that ever verified a key (74 MB after three keys).
static WORK_MEMORY: Mutex<Vec<Block>> = Mutex::new(Vec::new());

/// Recomputes the hash with the parameters and salt stored in `phc`; compares in constant time.
/// `None` when `phc` cannot be used.
fn matches(key: &str, phc: &PasswordHash<'_>) -> Option<bool> {
    let algorithm = Algorithm::try_from(phc.algorithm).ok()?;
    let version = match phc.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let params = Params::try_from(phc).ok()?;
    let expected = phc.hash?;
    let mut salt = [0u8; 64];
    let salt = phc.salt?.decode_b64(&mut salt).ok()?;
    let mut out = vec![0u8; expected.len()];
    let blocks = params.block_count();
    let mut memory = WORK_MEMORY.lock().unwrap_or_else(PoisonError::into_inner);
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(key.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .ok()?;
    Some(Output::new(&out).ok()? == expected)
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
    fn verification_uses_the_parameters_stored_in_the_hash() {
        let small = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 1, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let hash = small.hash_password(b"mk_other", &salt).unwrap().to_string();
        assert!(hash.contains("m=64,t=1,p=1"));
        assert!(verify_key("mk_other", Some(&hash)));
        assert!(!verify_key("mk_otheR", Some(&hash)));
    }

    #[test]
    fn the_same_key_hashes_differently_each_time() {
        assert_ne!(hash_key("k").unwrap(), hash_key("k").unwrap());
    }
}
