//! One module per `maestra` subcommand: its options and its `run`; `main.rs` only parses and
//! dispatches.

pub mod install;
pub mod keys;
pub mod migrate;
pub mod serve;

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
