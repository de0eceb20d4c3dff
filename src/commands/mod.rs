//! One module per `maestra` subcommand: its options and its `run`.

pub mod ask;
pub mod health;
pub mod keys;
pub mod mcp;
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

/// Logs for a client command (`ask`, `health`, `mcp`): warnings only unless RUST_LOG says
/// otherwise, on stderr, so stdout carries only the command's output (for `mcp`, JSON-RPC).
pub fn client_logs() -> anyhow::Result<()> {
    crate::telemetry::init(&crate::config::LogSettings {
        format: crate::config::LogFormat::Json,
        level: "warn".to_owned(),
    })
}

/// The runtime a client command runs on: one thread is plenty for a few requests.
pub fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
