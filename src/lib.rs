//! Maestra Backend: the one HTTP service behind every Maestra surface.
//!
//! A request travels one line: `api` (HTTP, ids, errors) → `service` (a conversation turn) →
//! `store` (where conversations live) and `responder` (who writes the reply).

pub mod api;
pub mod auth;
pub mod client;
pub mod commands;
pub mod config;
pub mod db;
pub mod domain;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub mod idempotency;
pub mod mcp;
pub mod metrics;
pub mod ratelimit;
pub mod responder;
pub mod service;
pub mod service_unit;
pub mod startup;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod turns;
pub mod usage_log;
pub mod usage_report;
