//! `maestra serve`: the HTTP service, in the mode MAESTRA_MODE names.

use crate::config::Settings;
use crate::startup::Application;
use crate::telemetry::{self, LogOutput};

pub fn run() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let _telemetry = telemetry::init(&settings.log, LogOutput::Split)?;
    telemetry::log_panics();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let app = Application::build(settings).await?;
            app.run_until_stopped().await?;
            Ok(())
        })
}
