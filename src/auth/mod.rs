//! Cloud mode's API keys: their format, argon2 hashing, the verifying cache, the operator's
//! table operations and the HTTP gate.

mod authenticator;
mod hash;
mod key;
pub mod middleware;
pub mod repository;

pub use authenticator::{AuthError, Authenticator, Principal};
pub use key::KeyId;
