//! The `maestra` command: parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use maestra::commands::install::{self, InstallOpts, UninstallOpts};
use maestra::config::Settings;
use maestra::startup::Application;
use maestra::telemetry;

/// Maestra Backend: one HTTP service behind the IDE, browser, CLI and mobile surfaces.
#[derive(Parser)]
#[command(name = "maestra", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service. The mode comes from MAESTRA_MODE (default: local, on
    /// 127.0.0.1, the first free port of 8825-8829, data in ~/.8825).
    Serve,
    /// Start the local server at login, as a service: a LaunchAgent on macOS
    /// (com.8825.maestra), a systemd user unit on Linux (maestra.service). Running it again
    /// rewrites the file and restarts the service. Secrets are never written into the file.
    Install(InstallOpts),
    /// Stop the auto-start service and remove its file. Conversations and settings are kept.
    Uninstall(UninstallOpts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => serve(),
        Command::Install(opts) => install::install(&opts),
        Command::Uninstall(opts) => install::uninstall(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maestra: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init(&settings.log)?;
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
