//! `maestra mcp`: the conversation-hub MCP server on stdio (see `crate::mcp`).

use super::one_shot_runtime;
use crate::client::ClientSettings;

pub fn run() -> anyhow::Result<()> {
    // stdout is the JSON-RPC channel: logs go to stderr, and nothing else is printed.
    let _telemetry = super::client_logs()?;
    crate::telemetry::log_panics();
    let settings = ClientSettings::from_env()?;
    one_shot_runtime()?.block_on(crate::mcp::serve_stdio(&settings))
}
