//! Black-box tests: the service over real HTTP on a random port, and the real binary.

#![expect(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed assertion"
)]

mod advisor;
mod bad_input;
mod conversations;
mod core;
mod fake_provider;
mod health;
mod helpers;
mod process;
mod provider;
mod store;
mod streaming;
mod usage;
