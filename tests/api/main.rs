//! Black-box tests: the service over real HTTP on a random port, and the real binary.

#![expect(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed assertion"
)]

mod bad_input;
mod clients;
mod cloud;
mod conversations;
mod core;
mod health;
mod helpers;
mod hostile;
mod mcp;
mod observability;
mod openapi;
mod process;
mod reliability;
mod store;
