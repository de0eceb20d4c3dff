//! Deployment, checked by the tools that consume it: the auto-start service file (parsed back,
//! verified by systemd), `maestra install`/`uninstall` through the real binary, and the
//! container and Replit recipes.

#![expect(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed assertion"
)]

mod helpers;
mod install_command;
mod recipes;
mod service_file;
