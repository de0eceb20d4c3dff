//! The `maestra` command: parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use maestra::config::Settings;
use maestra::startup::Application;
use maestra::{telemetry, usage_report};

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
    /// Requests, tokens and cost in USD per day (UTC) and model, read from the local ledger
    /// <data>/maestra_metrics.jsonl (MAESTRA_DATA_DIR, default ~/.8825).
    Usage(usage_report::Opts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => serve(),
        Command::Usage(opts) => usage(&opts),
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

fn usage(opts: &usage_report::Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    usage_report::run(opts, &settings.data_dir)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
