//! Subcommands other than `serve`, one module each; `main.rs` only parses and dispatches.

pub mod install;
