//! One module per `maestra` subcommand: its options and its `run`; `main.rs` only parses and
//! dispatches.

pub mod ask;
pub mod health;
pub mod install;
pub mod keys;
pub mod mcp;
pub mod migrate;
pub mod serve;
pub mod sync;
pub mod usage;

use crate::config::Settings;
use crate::telemetry::{self, LogOutput, TelemetryGuard};

/// Settings for an operator command: logs kept to warnings on stderr, so its own output stays
/// readable. Keep the guard until the command ends.
pub fn quiet_settings() -> anyhow::Result<(Settings, TelemetryGuard)> {
    let mut settings = Settings::load()?;
    if std::env::var_os("RUST_LOG").is_none() {
        settings.log.level = "warn".to_owned();
    }
    let guard = telemetry::init(&settings.log, LogOutput::Stderr)?;
    Ok((settings, guard))
}

/// Logs for a client command (`ask`, `health`, `mcp`): warnings only unless RUST_LOG says
/// otherwise, on stderr, so stdout carries only the command's output (for `mcp`, JSON-RPC).
/// Keep the guard until the command ends.
pub fn client_logs() -> anyhow::Result<TelemetryGuard> {
    telemetry::init(
        &crate::config::LogSettings {
            format: crate::config::LogFormat::Json,
            level: "warn".to_owned(),
        },
        LogOutput::Stderr,
    )
}

/// The runtime a one-shot command runs on: one thread is plenty for a few requests.
pub fn one_shot_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
