//! The `maestra` command: parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use maestra::commands::install::{InstallOpts, UninstallOpts};
use maestra::commands::{
    self, ask::AskArgs, health::HealthArgs, keys::KeysCommand, sync::SyncCommand,
};
use maestra::usage_report;

/// Maestra Backend: one HTTP service behind the IDE, browser, CLI and mobile surfaces.
#[derive(Parser)]
#[command(name = "maestra", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service. The mode comes from MAESTRA_MODE: local (default: 127.0.0.1, the
    /// first free port of 8825-8829, data in ~/.8825) or cloud (0.0.0.0:8000, Postgres at
    /// DATABASE_URL, API keys required).
    Serve,
    /// Apply the database migrations to DATABASE_URL (cloud mode's `serve` also does).
    Migrate,
    /// Manage cloud API keys in the database at DATABASE_URL.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Start the local server at login, as a service: a LaunchAgent on macOS
    /// (com.8825.maestra), a systemd user unit on Linux (maestra.service). Running it again
    /// rewrites the file and restarts the service. Secrets are never written into the file.
    Install(InstallOpts),
    /// Stop the auto-start service and remove its file. Conversations and settings are kept.
    Uninstall(UninstallOpts),
    /// Send one message and print the reply: the local backend first, the cloud as fallback.
    Ask(AskArgs),
    /// Show the local and the cloud backend's health side by side (exit 1 if neither is up).
    Health(HealthArgs),
    /// Sync the local server with a cloud (one conversation space): setup, status, now, remove.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Run the conversation-hub MCP server on stdio (for IDEs: "command": "maestra", "args": ["mcp"]).
    Mcp,
    /// Requests, tokens and cost in USD per day (UTC) and model, read from the local ledger
    /// <data>/maestra_metrics.jsonl (MAESTRA_DATA_DIR, default ~/.8825).
    Usage(usage_report::Opts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => commands::serve::run(),
        Command::Migrate => commands::migrate::run(),
        Command::Keys(command) => commands::keys::run(command),
        Command::Install(opts) => commands::install::install(&opts),
        Command::Uninstall(opts) => commands::install::uninstall(&opts),
        Command::Ask(args) => commands::ask::run(args),
        Command::Health(args) => commands::health::run(args),
        Command::Sync(command) => commands::sync::run(command),
        Command::Mcp => commands::mcp::run(),
        Command::Usage(opts) => commands::usage::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maestra: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
