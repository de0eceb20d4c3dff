//! One module per `maestra` subcommand: its options and its `run`; `main.rs` only parses and
//! dispatches.

pub mod install;
pub mod keys;
pub mod migrate;
pub mod serve;

use crate::config::Settings;

/// Settings for an operator command: logs kept to warnings, so its own output stays readable.
pub fn quiet_settings() -> anyhow::Result<Settings> {
    let mut settings = Settings::load()?;
    if std::env::var_os("RUST_LOG").is_none() {
        settings.log.level = "warn".to_owned();
    }
    crate::telemetry::init(&settings.log)?;
    Ok(settings)
}
