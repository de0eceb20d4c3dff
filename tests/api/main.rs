//! Black-box tests: the service over real HTTP on a random port, and the real binary.

#![expect(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed assertion"
)]

mod advisor;
mod bad_input;
mod clients;
mod cloud;
mod conversations;
mod core;
mod disk_full;
mod edges;
mod fake_provider;
mod health;
mod helpers;
mod hostile;
mod idempotency;
mod mcp;
mod observability;
mod openapi;
mod pgbouncer;
mod process;
mod provider;
mod readme;
mod reliability;
mod replicas;
mod rig;
mod schema;
mod store;
mod streaming;
mod sync;
mod sync_crash;
mod usage;
